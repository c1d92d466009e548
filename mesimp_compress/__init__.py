"""mesimp_compress: meProp fine-tuning, meSimp model simplification, ONNX proof.

Importing this package needs neither Typer nor Rich::

    import mesimp_compress as mc
    result = mc.compress(model, train, eval, config=mc.CompressConfig(k=0.3), out="runs/x")
    small = mc.load(build_model(), "runs/x")
"""

from __future__ import annotations

__version__ = "0.1.0"

from .activity import ActivityTracker  # noqa: E402
from .api import CompressResult, compress, load  # noqa: E402
from .config import CompressConfig  # noqa: E402
from .errors import (  # noqa: E402
    BuildError,
    CheckpointError,
    ConfigError,
    DataError,
    ExportError,
    KError,
    MesimpError,
    NonFiniteLossError,
    OutputError,
    OutputExistsError,
    ParityError,
    PlanError,
    ShapeError,
    SizeError,
    SpecError,
    UnsupportedStructureError,
)
from .events import Event  # noqa: E402
from .meprop import apply_meprop, remove_meprop, set_k  # noqa: E402
from .optim import RowSparseAdam, RowSparseSGD  # noqa: E402
from .plan import Plan  # noqa: E402

__all__ = [
    "__version__",
    "compress",
    "load",
    "CompressConfig",
    "CompressResult",
    "Plan",
    "apply_meprop",
    "remove_meprop",
    "set_k",
    "ActivityTracker",
    "RowSparseAdam",
    "RowSparseSGD",
    "Event",
    "MesimpError",
    "BuildError",
    "ConfigError",
    "KError",
    "SpecError",
    "DataError",
    "ShapeError",
    "UnsupportedStructureError",
    "PlanError",
    "CheckpointError",
    "NonFiniteLossError",
    "ExportError",
    "ParityError",
    "SizeError",
    "OutputError",
    "OutputExistsError",
]
