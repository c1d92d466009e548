"""An output directory that appears whole or not at all.

Files are written into a hidden staging folder beside the target, each under a temporary
name then renamed; ``commit`` renames the folder into place. A run that fails leaves the
target untouched (and removes its staging folder).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import OutputError, OutputExistsError, describe

NAME_MAX = 255  # bytes in one path component on the usual file systems
SIBLING_EXTRA = 32  # what the hidden siblings add to the name: ".NAME.partial-PID-XXXXXXXX"


class OutputDir:
    """Stage files for ``path`` and publish them atomically with :meth:`commit`."""

    def __init__(self, path: str | Path, *, force: bool = False) -> None:
        self.path = Path(path)
        if self.path.is_symlink():  # write where it points (the link stays), even dangling:
            self.path = Path(os.path.realpath(self.path))  # renaming over it replaced the link
        self.force = force
        if self.path.name in ("", ".", ".."):
            raise OutputError(
                f"the output must name a folder to create or replace, not {str(path)!r} "
                "(the run writes hidden siblings beside it and replaces it whole)"
            )
        if len(os.fsencode(self.path.name)) > NAME_MAX - SIBLING_EXTRA:
            raise OutputError(
                f"the output folder name is too long ({len(self.path.name)} characters): the "
                "hidden folders written beside it would pass the file system's limit"
            )
        if self.path.exists():
            if not self.path.is_dir():
                raise OutputExistsError(f"output path {self.path} exists and is not a directory")
            if any(self.path.iterdir()) and not force:
                raise OutputExistsError(
                    f"output directory {self.path} exists and is not empty "
                    "(use --force, or force=True, to replace it)"
                )
        check_parent(self.path, "output")  # created with the staging folder, not before
        if self.path.parent.is_dir():  # can a folder be made there at all (/proc, a full disk)?
            try:
                os.rmdir(tempfile.mkdtemp(prefix=f".{self.path.name}.probe-",
                                          dir=self.path.parent))
            except OSError as exc:
                raise OutputError(f"cannot create the output folder in {self.path.parent}: "
                                  f"{describe(exc)}") from exc
        self._staging: Path | None = None
        self._made: list[Path] = []  # folders made for the output, gone again on discard
        self.published = False  # set by commit()
        self._sweep()

    def _sweep(self) -> None:
        """Remove the hidden siblings a killed run left (its staging or replaced folder):
        those named with the id of a process that no longer runs."""
        for sibling in self.path.parent.glob(f".{glob.escape(self.path.name)}.*-*"):
            kind, _, rest = sibling.name[len(self.path.name) + 2:].partition("-")
            pid = rest.split("-", 1)[0]
            if kind in ("partial", "old") and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(sibling, ignore_errors=True)

    @property
    def staging(self) -> Path:
        """The folder files are written into before commit."""
        if self._staging is None:
            self._made = make_parent(self.path, "output")
            try:
                self._staging = Path(
                    tempfile.mkdtemp(prefix=f".{self.path.name}.partial-{os.getpid()}-",
                                     dir=self.path.parent)
                )
            except OSError as exc:
                raise OutputError(f"cannot create the output folder in {self.path.parent}: "
                                  f"{describe(exc)}") from exc
            usual_mode(self._staging)  # it becomes the output folder
        return self._staging

    def file(self, name: str) -> Path:
        """Path of a file inside the staging folder (parents created)."""
        p = self.staging / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_with(self, name: str, writer: Callable[[Path], Any]) -> Path:
        """Call ``writer(tmp_path)`` then rename the temporary file to ``name``."""
        final = self.file(name)
        tmp = final.with_name(f".{final.name}.tmp")
        try:
            writer(tmp)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
        return final

    def write_json(self, name: str, data: Any) -> Path:
        """Write ``data`` as indented JSON, atomically."""

        def writer(p: Path) -> None:
            p.write_text(
                json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n",
                encoding="utf-8",
            )

        return self.write_with(name, writer)

    def commit(self) -> Path:
        """Publish the staged files at ``path`` (replacing an old folder only with force)."""
        staging = self.staging
        old: Path | None = None
        if self.path.exists():
            if any(self.path.iterdir()) and not self.force:
                raise OutputExistsError(f"output directory {self.path} appeared during the run")
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.replace(self.path, old)
        os.replace(staging, self.path)
        self._staging = None
        self.published = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.path

    def discard(self) -> None:
        """Remove the staging folder (the target is untouched)."""
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        remove_empty(self._made)
        self._made = []


@contextmanager
def staged_file(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file beside ``path`` (parents made, the umask's usual mode) for the block
    to write; renamed onto ``path`` when the block ends normally, removed otherwise, so a
    failure never leaves a half-written file under the final name."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    usual_mode(tmp)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_synced(path: str | os.PathLike[str], write: Callable[[Any], Any]) -> Path:
    """Write ``path`` atomically with ``write(binary_handle)``, flushed to disk first."""
    with staged_file(path) as tmp, open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    return Path(path)


def usual_mode(path: str | os.PathLike[str]) -> None:
    """Give a file or folder made by ``tempfile`` (private: 0600/0700) the mode any new one
    gets under the process's umask, as the user's other files have."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)


def check_parent(path: Path, what: str) -> None:
    """OutputError unless the folder ``path`` goes in exists or can be made there: its
    nearest existing ancestor must be a writable folder."""
    parent = path.parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise OutputError(
            f"cannot create the folder {parent} for the {what}: {existing} is not a folder"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write the {what} into {existing}: not a writable folder")


def make_parent(path: Path, what: str) -> list[Path]:
    """Create the folder ``path`` goes in; return the folders made (deepest first), for
    :func:`remove_empty` after a failure."""
    parent = path.parent
    missing = [p for p in (parent, *parent.parents) if not p.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a folder should be, no permission, ...
        raise OutputError(
            f"cannot create the folder {parent} for the {what}: "
            f"{exc.strerror or exc} ({exc.filename})"
        ) from None
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty: what a failed run made."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (this one always does)."""
    if pid == os.getpid() or os.name == "nt":  # Windows' os.kill would end the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process, or no way to ask: leave its files alone
        return True
    return True
