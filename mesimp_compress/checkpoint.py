"""Window checkpoints: a run interrupted (Ctrl-C, ``kill -9``, a NaN) resumes where it stopped.

After every window the fine-tuner writes one file, ``checkpoint.pt``, to a temporary name and
renames it, so the file on disk is always a whole window. It holds only plain data (tensors,
numbers, strings, lists, dicts) and is read back with ``torch.load(weights_only=True)``: the
cumulative plan as JSON data, the model's state_dict, the optimizer and tracker states, the
position (epoch, batch, window, step), the history, and the random number generator states,
including those at the start of every epoch so that the data order can be replayed.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, describe
from .outputs import write_synced

FILE = "checkpoint.pt"
FORMAT = "mesimp-checkpoint"
VERSION = 1
# what every checkpoint holds (later keys, such as "notes" or "origin", may be absent)
REQUIRED = ("config", "epoch", "batch", "window", "step", "plan", "model", "optimizer",
            "tracker", "history", "rollbacks", "frozen", "metric_before", "epoch_rng", "rng")


def default_dir(out: str | os.PathLike[str]) -> Path:
    """Where the checkpoints of a run writing ``out`` live: a hidden folder beside it."""
    target = Path(out)
    return target.parent / f".{target.name}.checkpoint"


class Checkpointer:
    """Save and load the one checkpoint of a run in ``directory``."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    @property
    def path(self) -> Path:
        return self.directory / FILE

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, state: dict[str, Any]) -> Path:
        """Write ``state`` atomically (temporary file, then rename)."""
        payload = {"format": FORMAT, "version": VERSION, **state}
        return write_synced(self.path, lambda handle: torch.save(payload, handle))

    def load(self) -> dict[str, Any]:
        """Read the checkpoint; CheckpointError if it is missing or not one of ours."""
        if not self.exists():
            raise CheckpointError(f"no checkpoint to resume from in {self.directory}")
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
            raise CheckpointError(f"cannot read checkpoint {self.path}: {describe(exc)}") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CheckpointError(f"{self.path} is not a mesimp checkpoint")
        if state.get("version") != VERSION:
            raise CheckpointError(f"checkpoint version {state.get('version')!r} is not supported")
        if not isinstance(state.get("config"), dict):
            raise CheckpointError(f"{self.path} is damaged: it holds no settings")
        return state

    def check(self, state: dict[str, Any]) -> None:
        """CheckpointError unless ``state`` holds all a resume reads."""
        missing = [key for key in REQUIRED if key not in state]
        if missing:
            raise CheckpointError(f"{self.path} is damaged: it lacks {', '.join(missing[:4])}")
        for key in ("plan", "model", "optimizer", "tracker"):
            if not isinstance(state[key], dict):
                raise CheckpointError(
                    f"{self.path} is damaged: its {key} is a {type(state[key]).__name__}"
                )

    def clear(self) -> None:
        """Remove the checkpoint folder (after a successful run)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def fingerprint(model: torch.nn.Module) -> str:
    """A digest of ``model``'s state_dict (names, dtypes, shapes, values): a resume must
    start from the same original weights as the run it continues."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            continue
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        data = value.detach().cpu().contiguous().reshape(-1)
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def rng_state() -> dict[str, Any]:
    """The states of torch's, Python's and NumPy's global generators, as plain data."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [
            kind,
            torch.from_numpy(keys.astype("int64")),
            int(pos),
            int(has_gauss),
            float(cached),
        ]
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
