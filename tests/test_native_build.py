"""Building the compiled meProp backward: where it goes and how a failed build is told
(no build needed to run these)."""

from __future__ import annotations

import pytest
import torch

from mesimp_compress.errors import BuildError
from mesimp_compress.meprop import native


def test_a_failed_build_is_a_typed_error_naming_its_cause(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):  # torch's message starts with the command it ran
        raise RuntimeError("Error building extension 'mesimp_native': [1/2] c++ -MMD -c "
                           "native.cpp -o native.o\n/bin/sh: 1: c++: not found\nninja: "
                           "build stopped: subcommand failed.")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setenv("MESIMP_CACHE", str(tmp_path))
    with pytest.raises(BuildError, match=r"in .*: /bin/sh: 1: c\+\+: not found$"):
        native.build()
    assert not native.is_built()


def test_build_dir_follows_torch_python_and_source(monkeypatch, tmp_path):
    monkeypatch.setenv("MESIMP_CACHE", str(tmp_path))
    where = native.build_dir()
    assert where.parent == tmp_path / "native"
    assert torch.__version__.replace("+", "_") in where.name
