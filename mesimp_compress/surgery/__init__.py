"""Surgery: rebuild smaller dense modules from a plan, in place.

- :func:`apply_plan` shrinks the model (optimizer state and compensation optional);
- :func:`zero_removed` builds the masked twin (same function, same shapes);
- :class:`ActivationMeans` measures consumer input means for compensation;
- :func:`save_compressed` / :func:`load_compressed` persist without pickle;
- :func:`register_pruner` adds a layer kind (see :mod:`.functions`).
"""

from __future__ import annotations

from . import lstm as _lstm  # noqa: F401  (registers the LSTM pruner)
from .apply import SurgeryReport, apply_plan, update_configs
from .compensation import ActivationMeans
from .functions import ModulePruner, Slice, pruner_for, register_pruner
from .masking import zero_removed
from .optimizer import check_optimizer_state, remap_optimizer_state
from .persist import PLAN_FILE, WEIGHTS_FILE, load_compressed, read_plan, save_compressed

__all__ = [
    "apply_plan",
    "SurgeryReport",
    "update_configs",
    "zero_removed",
    "ActivationMeans",
    "save_compressed",
    "load_compressed",
    "read_plan",
    "PLAN_FILE",
    "WEIGHTS_FILE",
    "ModulePruner",
    "Slice",
    "register_pruner",
    "pruner_for",
    "check_optimizer_state",
    "remap_optimizer_state",
]
