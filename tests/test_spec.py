import textwrap

import pytest
import torch
from torch import nn

from mesimp_compress.errors import CheckpointError, SpecError
from mesimp_compress.spec import load_factory, load_object, load_weights


def _write(folder, name, body):
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


@pytest.fixture
def model_file(tmp_path):
    _write(tmp_path, "helper_mod_for_spec.py", "WIDTH = 3\n")
    return _write(
        tmp_path,
        "net.py",
        """
        from torch import nn
        from helper_mod_for_spec import WIDTH   # a sibling module, as when run as a script

        class Holder:
            def make(self):
                return nn.Linear(2, WIDTH)

        holder = Holder()
        NUMBER = 7

        def build():
            return nn.Sequential(nn.Linear(4, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 2))

        def not_a_model():
            return 42

        def broken():
            raise ValueError("no such width")
        """,
    )


def test_file_spec_resolves_names_dotted_names_and_shares_the_module(model_file):
    build = load_object(f"{model_file}:build")
    assert isinstance(build(), nn.Sequential)
    assert load_object(f"{model_file}:holder.make")().out_features == 3
    assert load_object(f"{model_file}:NUMBER", require_callable=False) == 7
    assert load_object(f"{model_file}:build").__module__ == build.__module__  # imported once


def test_module_spec_resolves_an_installed_module():
    assert load_object("mesimp_compress.tasks:accuracy").__name__ == "accuracy"
    assert load_object("torch.nn:Linear") is nn.Linear


@pytest.mark.parametrize(
    "spec, message",
    [
        ("model.py", "has no ':'"),
        ("missing_dir/none.py:build", "file 'missing_dir/none.py' not found"),
        ("no_such_package_xyz.mod:build", "module 'no_such_package_xyz.mod' not found"),
        ("mesimp_compress.tasks:nothing", "has no attribute 'nothing' (available: "),
        ("mesimp_compress.tasks:IGNORE_INDEX", "names a int, not a callable"),
        (":build", "needs both"),
    ],
)
def test_bad_specs_are_one_line_spec_errors(spec, message):
    with pytest.raises(SpecError) as info:
        load_object(spec, what="model factory")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_attribute_lists_some_available_names(model_file):
    with pytest.raises(SpecError, match=r"available: Holder, NUMBER, WIDTH, broken, build, holder"):
        load_object(f"{model_file}:biuld")


def test_a_file_raising_on_import_names_the_exception(tmp_path):
    bad = _write(tmp_path, "bad.py", "import torch\nraise RuntimeError('boom at import')\n")
    with pytest.raises(SpecError, match=r"raised RuntimeError: boom at import"):
        load_object(f"{bad}:build")
    syntax = _write(tmp_path, "syntax.py", "def build(:\n")
    with pytest.raises(SpecError, match="raised SyntaxError"):
        load_object(f"{syntax}:build")


def test_load_factory_calls_it_and_checks_the_result(model_file):
    model = load_factory(f"{model_file}:build")
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [3, 2]
    with pytest.raises(SpecError, match=r"returned a int, expected a torch.nn.Module"):
        load_factory(f"{model_file}:not_a_model")
    with pytest.raises(SpecError, match=r"broken\(\) raised ValueError: no such width"):
        load_factory(f"{model_file}:broken")


# ---------------------------------------------------------------------- weights
def _net():
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_load_weights_reads_a_state_dict(tmp_path):
    torch.manual_seed(0)
    source = _net()
    torch.save(source.state_dict(), tmp_path / "w.pt")
    target = load_weights(_net(), tmp_path / "w.pt")
    assert torch.equal(target[0].weight, source[0].weight)
    assert torch.equal(target[2].bias, source[2].bias)


def test_load_weights_accepts_nested_and_ddp_prefixed_state_dicts(tmp_path):
    source = _net()
    torch.save({"epoch": 3, "state_dict": source.state_dict()}, tmp_path / "nested.pt")
    assert torch.equal(load_weights(_net(), tmp_path / "nested.pt")[0].weight, source[0].weight)
    ddp = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save(ddp, tmp_path / "ddp.pt")
    assert torch.equal(load_weights(_net(), tmp_path / "ddp.pt")[2].weight, source[2].weight)


def test_wrong_keys_and_shapes_name_the_first_offenders(tmp_path):
    state = _net().state_dict()
    del state["2.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "keys.pt")
    with pytest.raises(CheckpointError, match=r"missing '2.bias'; unexpected 'extra.weight'"):
        load_weights(_net(), tmp_path / "keys.pt")
    bigger = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    torch.save(bigger.state_dict(), tmp_path / "shapes.pt")
    with pytest.raises(CheckpointError, match=r"0.weight: file \(5, 4\) vs model \(3, 4\)"):
        load_weights(_net(), tmp_path / "shapes.pt")

    for value in ("hello", 3):
        state = _net().state_dict()
        state["2.bias"] = value
        torch.save(state, tmp_path / "values.pt")
        kind = type(value).__name__
        with pytest.raises(CheckpointError, match=rf"values.pt: '2.bias' is a {kind}, not a"):
            load_weights(_net(), tmp_path / "values.pt")


def test_a_pickled_module_needs_trust_pickle(tmp_path):
    source = _net()
    torch.save(source, tmp_path / "whole.pt")
    with pytest.raises(
        CheckpointError,
        match=r"not a plain state_dict \(it holds a pickled torch.nn.modules.container."
        r"Sequential\).*trust_pickle=True",
    ):
        load_weights(_net(), tmp_path / "whole.pt")
    loaded = load_weights(_net(), tmp_path / "whole.pt", trust_pickle=True)
    assert torch.equal(loaded[0].weight, source[0].weight)


def test_unreadable_or_missing_files_are_checkpoint_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(
        CheckpointError,
        match="cannot read weights .*junk.pt.: not a file written by torch.save, or damaged "
        r"\(Unsupported operand",
    ):
        load_weights(_net(), tmp_path / "junk.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt' is empty$"):
        load_weights(_net(), tmp_path / "empty.pt")
    (tmp_path / "proto.pt").write_bytes(b"hello world\x00\x01")  # torch.load: a raw KeyError
    with pytest.raises(CheckpointError, match=r"or damaged \(KeyError"):
        load_weights(_net(), tmp_path / "proto.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(_net(), tmp_path / "nope.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list, expected a state_dict"):
        load_weights(_net(), tmp_path / "list.pt")


def test_sys_exit_in_a_factory_or_at_import_is_a_spec_error_not_an_exit(tmp_path):
    """The library never exits: a script's sys.exit() becomes one typed line."""
    quits = _write(tmp_path, "quits.py", "import sys\n\ndef build():\n    sys.exit(0)\n")
    with pytest.raises(SpecError, match=r"build\(\) raised SystemExit \(sys.exit\(0\) was called"):
        load_factory(f"{quits}:build")
    at_import = _write(tmp_path, "at_import.py", "import sys\nsys.exit('bye')\n")
    with pytest.raises(SpecError, match=r"raised SystemExit \(sys.exit\('bye'\) was called\)"):
        load_object(f"{at_import}:build")


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("spoil, says", [
    (lambda t: t.to_sparse(), "'0.weight' is a sparse_coo tensor"),
    (lambda t: t.to("meta"), "'0.weight' is on the meta device"),
    (lambda t: torch.nested.nested_tensor([t[0], t[1]]), "'0.weight' is a nested tensor"),
])
def test_tensors_without_dense_data_are_checkpoint_errors(tmp_path, spoil, says):
    """They passed the key and shape checks and failed in load_state_dict (a traceback)."""
    state = _net().state_dict()
    state["0.weight"] = spoil(state["0.weight"])
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=says):
        load_weights(_net(), tmp_path / "w.pt")
