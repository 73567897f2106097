"""Atomic writes: a failure mid-write leaves the previous file intact and no temp files behind."""

import json

import pytest
import torch

from xmodal.io import append_jsonl, atomic_torch_save, atomic_write, atomic_write_json


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
