"""Atomic writes: a failure mid-write leaves the previous file intact and no temp files behind."""

import json
import os
import stat

import pytest
import torch

from xmodal.io import append_jsonl, atomic_torch_save, atomic_write, atomic_write_json, make_temp_dir


def test_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(path) as f:
            f.write(b"partial bytes")
            raise RuntimeError("boom")
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_json_and_jsonl(tmp_path):
    atomic_write_json(tmp_path / "a" / "m.json", {"x": 1})
    assert json.loads((tmp_path / "a" / "m.json").read_text()) == {"x": 1}
    append_jsonl(tmp_path / "m.jsonl", {"step": 1, "loss": torch.tensor(0.5).item()})
    append_jsonl(tmp_path / "m.jsonl", {"step": 2})
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    """Like open() and mkdir: not owner-only because the temp file came from mkstemp/mkdtemp."""
    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "results.json", {"x": 1})
        atomic_torch_save({"w": torch.ones(2)}, tmp_path / "model.pt")
        folder = make_temp_dir(tmp_path, prefix=".export.", suffix=".partial")
        append_jsonl(tmp_path / "metrics.jsonl", {"step": 1})
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)
    assert mode(tmp_path / "results.json") == mode(tmp_path / "model.pt") == 0o666 & ~umask
    assert mode(tmp_path / "results.json") == mode(tmp_path / "metrics.jsonl")
    assert mode(folder) == 0o777 & ~umask and folder.name.startswith(".export.")



def test_exported_folder_follows_the_umask(tmp_path, tiny_clip):
    """An export is staged in a temp folder and renamed into place: the folder must not stay 0700."""
    from conftest import tiny_clip_cfg

    from xmodal.students.export import export_open_clip

    old = os.umask(0o022)
    try:
        out = export_open_clip(tiny_clip(), tiny_clip_cfg(), tmp_path / "exported", verify=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
