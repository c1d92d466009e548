"""mesimp_compress: meProp fine-tuning, meSimp model simplification, ONNX proof.

Importing this package needs neither Typer nor Rich.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    DataError,
    ExportError,
    KError,
    MesimpError,
    NonFiniteLossError,
    OutputExistsError,
    ParityError,
    PlanError,
    ShapeError,
    SizeError,
    SpecError,
    UnsupportedStructureError,
)
from .events import Event  # noqa: E402

__all__ = [
    "__version__",
    "Event",
    "MesimpError",
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
    "OutputExistsError",
]
