"""Dynamic int8 quantisation of an exported ONNX model with onnxruntime's quantisation tools.

Weights are stored as int8 and activations are quantised at run time, so no calibration
data is needed. The result is checked like an export and appears only when it passed; its
parity and metric are checked by the caller with a looser tolerance than fp32.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ExportError
from .export import check_onnx, error_line, quiet
from .outputs import staged_file

INT8_ATOL = 0.05
INT8_RTOL = 0.05


def quantize_int8(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Write the int8 (dynamic) quantisation of the ONNX file ``src`` to ``dst``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        with staged_file(dst, suffix=".onnx.tmp") as tmp:
            with quiet():
                quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8)
            check_onnx(tmp)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - the quantiser raises many types
        raise ExportError(
            f"int8 quantisation of {Path(src).name} failed: {error_line(exc)}"
        ) from None
    return Path(dst)


__all__ = ["INT8_ATOL", "INT8_RTOL", "quantize_int8"]
