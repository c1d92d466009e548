import json

import pytest

from mesimp_compress.errors import OutputError, OutputExistsError
from mesimp_compress.outputs import OutputDir


def test_files_appear_only_on_commit(tmp_path):
    target = tmp_path / "run"
    out = OutputDir(target)
    out.write_json("report.json", {"a": 1})
    out.write_with("plots/w.txt", lambda p: p.write_text("x"))
    assert not target.exists()
    out.commit()
    assert json.loads((target / "report.json").read_text()) == {"a": 1}
    assert (target / "plots" / "w.txt").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging left behind


def test_non_empty_dir_refused_unless_force(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="--force"):
        OutputDir(target)
    out = OutputDir(target, force=True)
    out.write_json("report.json", [1])
    assert (target / "old.txt").exists()  # untouched until commit
    out.commit()
    assert sorted(p.name for p in target.iterdir()) == ["report.json"]


def test_discard_leaves_target_untouched(tmp_path):
    (tmp_path / "run").mkdir()
    out = OutputDir(tmp_path / "run")
    out.write_json("report.json", {})
    out.discard()
    assert list((tmp_path / "run").iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_failed_writer_leaves_no_partial_file(tmp_path):
    out = OutputDir(tmp_path / "run")

    def boom(p):
        p.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        out.write_with("weights.pt", boom)
    assert list(out.staging.iterdir()) == []


def test_a_file_in_the_way_is_refused(tmp_path):
    (tmp_path / "run").write_text("x")
    with pytest.raises(OutputExistsError, match="not a directory"):
        OutputDir(tmp_path / "run")


def test_a_file_where_a_parent_folder_should_be_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    for target in (tmp_path / "afile" / "run", tmp_path / "afile" / "deeper" / "run"):
        with pytest.raises(OutputError, match="cannot create the folder"):
            OutputDir(target)
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]
    assert issubclass(OutputExistsError, OutputError)


def test_siblings_a_killed_run_left_are_swept_and_others_kept(tmp_path):
    import os

    dead = 4_194_303  # above any pid in use here (pid_max is 4194304 at most)
    left = [tmp_path / f".out.partial-{dead}-abcd1234", tmp_path / f".out.old-{dead}"]
    kept = [tmp_path / f".out.partial-{os.getpid()}-efgh5678",  # a live run's staging
            tmp_path / f".other.partial-{dead}-abcd1234",  # another output's
            tmp_path / ".out.checkpoint"]  # what --resume needs
    for folder in left + kept:
        folder.mkdir()
    OutputDir(tmp_path / "out")
    assert [p.exists() for p in left] == [False, False]
    assert all(p.exists() for p in kept)


def test_folders_made_for_an_output_go_again_when_the_run_fails(tmp_path):
    target = tmp_path / "a" / "b" / "run"
    out = OutputDir(target)
    assert list(tmp_path.iterdir()) == []  # nothing made before the first file
    out.write_json("report.json", {"ok": True})
    assert (tmp_path / "a" / "b").is_dir()
    out.discard()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep.txt").write_text("x")  # a folder that holds something stays
    out = OutputDir(target)
    out.write_json("report.json", {"ok": True})
    out.discard()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["keep.txt"]
    out = OutputDir(target)
    out.write_json("report.json", {"ok": True})
    assert out.commit() == target and (target / "report.json").is_file()


def test_a_failed_export_leaves_no_folder_it_made(tmp_path):
    import torch

    from mesimp_compress.errors import MesimpError
    from mesimp_compress.export import export_onnx

    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(MesimpError):
        export_onnx(model, (torch.randn(2, 5),), tmp_path / "x" / "y" / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_published_folders_and_files_get_the_umask_mode_not_a_private_one(tmp_path):
    """tempfile makes 0700 folders and 0600 files: a run folder others could not read."""
    import os
    import stat

    import torch

    from mesimp_compress.plan import Plan
    from mesimp_compress.surgery import save_compressed

    old = os.umask(0o027)
    try:
        out = OutputDir(tmp_path / "run")
        out.write_json("report.json", {"ok": True})
        save_compressed(torch.nn.Linear(2, 2), Plan(kept={}, widths={}, edits=[]), out.staging)
        target = out.commit()
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [target, *target.iterdir()]}
    assert modes == {"run": 0o750, "report.json": 0o640, "plan.json": 0o640, "weights.pt": 0o640}


@pytest.mark.parametrize("target_exists", [True, False])
def test_an_output_that_is_a_symlink_is_written_where_it_points(tmp_path, target_exists):
    """The rename replaced the link with a folder and left a hidden '.link.old-PID' link
    for good; a dangling link failed with NotADirectoryError after the whole run."""
    real = tmp_path / "data" / "runs"
    if target_exists:
        real.mkdir(parents=True)
    else:
        (tmp_path / "data").mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    out = OutputDir(link)
    out.write_json("report.json", {"a": 1})
    out.commit()
    assert link.is_symlink() and json.loads((link / "report.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "link"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["runs"]
    with pytest.raises(OutputExistsError, match="--force"):
        OutputDir(link)  # the folder it points to is not empty now
