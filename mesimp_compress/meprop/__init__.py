"""meProp: backprop through the top-k units of each hidden layer (Sun et al., ICML 2017).

Drop-in subclasses of nn.Linear, nn.Conv1d, nn.Conv2d, nn.LSTM (and Hugging Face's Conv1D)
share the Parameters of the modules they wrap; :func:`apply_meprop` / :func:`remove_meprop`
convert a model in place and back.
"""

from __future__ import annotations

from .apply import apply_meprop, eligible, output_layer_of, remove_meprop, set_k, wrapped_layers
from .conv import MePropConv1d, MePropConv2d
from .hfconv import MePropHFConv1D
from .linear import MePropLinear
from .lstm import MePropLSTM
from .settings import MODES, MePropSettings, resolve_k

__all__ = [
    "MODES",
    "MePropConv1d",
    "MePropConv2d",
    "MePropHFConv1D",
    "MePropLSTM",
    "MePropLinear",
    "MePropSettings",
    "apply_meprop",
    "eligible",
    "output_layer_of",
    "remove_meprop",
    "resolve_k",
    "set_k",
    "wrapped_layers",
]
