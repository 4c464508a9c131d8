"""The output-folder contract (compressor.outdir): what --out may be, locking, publishing, modes."""

from __future__ import annotations

import json
import os
import stat

import pytest

from compressor.errors import ModelError, OutputError
from compressor.outdir import MARKER, check_output_dir, claim_output, output_lock, read_marker, staged_output


def _write(folder, files):
    with staged_output(folder, overwrite=True) as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)


def test_new_and_empty_folders_are_accepted_and_marked(tmp_path):
    (tmp_path / "empty").mkdir()
    for name in ("new/deep", "empty"):
        _write(tmp_path / name, {"report.json": "{}", "sub/a.txt": "a"})
        marker = read_marker(tmp_path / name)
        assert sorted(marker["files"]) == ["report.json", "sub/a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new"]  # no staging / lock left


@pytest.mark.parametrize("case", ["user_files", "previous_without_overwrite", "previous_plus_user_file", "file"])
def test_refused_folders_are_left_untouched(tmp_path, case):
    out = tmp_path / "out"
    if case == "file":
        out.write_text("mine")
    elif case == "user_files":
        out.mkdir()
        (out / "report.json").write_text("my own report")  # looks like ours, but no marker
    else:
        _write(out, {"report.json": "{}"})
        if case == "previous_plus_user_file":
            (out / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    overwrite = case != "previous_without_overwrite"
    with pytest.raises(OutputError) as err:
        check_output_dir(out, overwrite=overwrite)
    assert "\n" not in str(err.value) and "--out" in str(err.value)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_overwrite_replaces_only_listed_files(tmp_path):
    out = tmp_path / "out"
    _write(out, {"report.json": "old", "old-only.txt": "x"})
    _write(out, {"report.json": "new"})
    assert (out / "report.json").read_text() == "new"
    assert not (out / "old-only.txt").exists()  # ours, listed in the old marker
    assert read_marker(out)["files"] == ["report.json"]


def test_a_user_file_dropped_in_during_a_run_survives_the_publish(tmp_path):
    out = tmp_path / "out"
    _write(out, {"report.json": "old"})
    with staged_output(out, overwrite=True) as tmp:
        (tmp / "report.json").write_text("new")
        (out / "mine.txt").write_text("precious")  # appears while the run works
    assert (out / "mine.txt").read_text() == "precious"
    assert (out / "report.json").read_text() == "new"


def test_input_folder_current_folder_and_parents_are_refused(tmp_path, monkeypatch):
    model = tmp_path / "models" / "ckpt"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    for out, inputs in ((model, [str(model)]), (model.parent, [str(model)])):
        with pytest.raises(OutputError, match="holds the input"):
            check_output_dir(out, inputs=inputs)
    monkeypatch.chdir(model)
    for out in (".", "..", str(tmp_path)):
        with pytest.raises(OutputError, match="current folder or a parent"):
            check_output_dir(out)


def test_a_second_run_into_the_same_out_fails_at_once(tmp_path):
    out = tmp_path / "out"
    with claim_output(out):
        with pytest.raises(OutputError, match="another compressor run is writing"):
            with claim_output(out):
                pass
    with claim_output(out):  # released
        pass
    assert not (tmp_path / ".out.lock").exists()


def test_lock_survives_only_its_holder(tmp_path):
    out = tmp_path / "out"
    with output_lock(out) as lock:
        assert lock.read_text().strip() == str(os.getpid())
    assert not lock.exists()


def test_failed_staging_is_removed_and_out_untouched(tmp_path):
    out = tmp_path / "out"
    _write(out, {"report.json": "old"})
    with pytest.raises(RuntimeError), staged_output(out, overwrite=True) as tmp:
        (tmp / "report.json").write_text("half")
        raise RuntimeError("boom")
    assert (out / "report.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_unusable_result_goes_to_failed_folder(tmp_path):
    out = tmp_path / "out"
    with claim_output(out) as claim, pytest.raises(ModelError, match="out.failed") as err:
        with claim.stage() as tmp:
            (tmp / "report.json").write_text("{}")
            claim.publish(tmp, problems=["perplexity is nan"])
    assert "perplexity is nan" in str(err.value)
    assert not out.exists()
    assert json.loads((tmp_path / "out.failed" / MARKER).read_text())["failed"] == "perplexity is nan"


def test_modes_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with staged_output(tmp_path / "out") as tmp:
            (tmp / "weights.safetensors").write_text("x")
            (tmp / "weights.safetensors").chmod(0o600)  # what safetensors does
            (tmp / "sub").mkdir(mode=0o700)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "sub").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "weights.safetensors").stat().st_mode) == 0o644


def test_stale_staging_of_a_killed_run_is_salvaged_and_removed(tmp_path):
    stale = tmp_path / ".out.tmp-999999-abc"
    (stale / "checkpoints" / "step-2").mkdir(parents=True)
    (stale / "checkpoints" / "step-2" / "meta.json").write_text("{}")
    (stale / "model.safetensors").write_text("big")
    (stale / ".compressor-staging").write_text("999999\n")  # what every staging folder holds
    with claim_output(tmp_path / "out"):
        pass
    assert not stale.exists()
    assert (tmp_path / "out.partial" / "checkpoints" / "step-2" / "meta.json").is_file()
