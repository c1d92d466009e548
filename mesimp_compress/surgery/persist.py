"""A compressed model on disk without pickle: ``plan.json`` plus ``weights.pt`` (a state_dict).

Loading builds nothing itself: the caller's factory builds the original model, the plan is
replayed on it, and the weights are loaded (``torch.load(weights_only=True)``). Each file is
written to a temporary name in the target folder and renamed into place, so a crash never
leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, PlanError
from ..outputs import write_synced
from ..plan import Plan
from ..spec import check_state_dict, read_weights
from .apply import apply_plan

PLAN_FILE = "plan.json"
WEIGHTS_FILE = "weights.pt"


def save_compressed(model: nn.Module, plan: Plan, directory: str | os.PathLike[str]) -> Path:
    """Write ``plan.json`` and ``weights.pt`` of ``model`` (shrunk by ``plan``) to a folder."""
    plan.validate()
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    write_synced(folder / WEIGHTS_FILE, lambda h: torch.save(state, h))
    write_synced(folder / PLAN_FILE, lambda h: h.write(plan.to_json().encode("utf-8")))
    return folder


def read_plan(path: str | os.PathLike[str]) -> Plan:
    """Read a plan file (or ``plan.json`` inside a folder); PlanError if it is malformed."""
    file = Path(path)
    if file.is_dir():
        file = file / PLAN_FILE
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as err:
        raise PlanError(f"cannot read plan '{file}': {err.strerror or err}") from err
    except UnicodeDecodeError:
        raise PlanError(f"plan '{file}' is not a plan.json (not UTF-8 text)") from None
    return Plan.from_json(text)


def load_compressed(
    model: nn.Module,
    plan: Plan | str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor] | str | os.PathLike[str] | None = None,
    *,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Replay ``plan`` on a freshly built ``model`` and load the compressed weights into it.

    ``plan`` is a Plan, a plan file or a folder written by :func:`save_compressed`;
    ``state_dict`` is a mapping or a weights file, and defaults to ``weights.pt`` beside the
    plan. Returns ``model``. Raises PlanError if the plan does not fit the model and
    CheckpointError if the weights cannot be read or do not fit.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"load needs a freshly built nn.Module (call your factory: load(build(), ...)); "
            f"got {type(model).__name__}"
        )
    if not isinstance(plan, (Plan, str, os.PathLike)):
        raise PlanError(f"plan must be a Plan or a path, got {type(plan).__name__}")
    if not isinstance(state_dict, (Mapping, str, os.PathLike, type(None))):
        raise CheckpointError(
            f"state_dict must be a mapping or a path, got {type(state_dict).__name__}"
        )
    folder: Path | None = None
    if not isinstance(plan, Plan):
        folder = Path(plan) if Path(plan).is_dir() else Path(plan).parent
        plan = read_plan(plan)
    if state_dict is None:
        if folder is None:
            raise CheckpointError("no state_dict given and no folder to find weights.pt in")
        state_dict = folder / WEIGHTS_FILE
    source = "the compressed state_dict"
    if not isinstance(state_dict, Mapping):
        source = f"weights file {str(state_dict)!r}"
        state_dict = read_weights(state_dict, map_location=map_location)
        if not isinstance(state_dict, Mapping):
            raise CheckpointError(
                f"weights file holds a {type(state_dict).__name__}, not a state_dict"
            )
    apply_plan(model, plan)
    check_state_dict(model, state_dict, source=source)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise CheckpointError(
            "compressed weights do not fit the model rebuilt from the plan: "
            + " ".join(line.strip() for line in first[:3])
        ) from err
    return model


__all__ = ["save_compressed", "load_compressed", "read_plan", "PLAN_FILE", "WEIGHTS_FILE"]
