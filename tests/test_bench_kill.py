"""The crash benchmark's checkers: what counts as a corrupt file, a leftover temp, a bit-exact recovery."""

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import torch

from xmodal.engine.checkpoint import save_checkpoint

_spec = importlib.util.spec_from_file_location(
    "bench_kill", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kill.py"
)
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_kill"] = bench  # dataclasses look their module up by name
_spec.loader.exec_module(bench)


def small_state(step: int = 2, seed: int = 0) -> dict:
    bn = torch.nn.BatchNorm1d(3)
    bn(torch.randn(4, 3, generator=torch.Generator().manual_seed(seed)))  # running statistics off their start
    return {"model": dict(bn.state_dict()), "step": step}


def write_run(root: Path) -> Path:
    """A run folder as a killed distill could leave it, all intact."""
    ckpts = root / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    save_checkpoint(small_state(2), ckpts / "step_0000002.pt")
    (ckpts / "latest").write_text("step_0000002.pt\n")
    (root / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    (root / "run" / "results.json").write_text('{"cer": 0.5}')
    (root / "run" / ".lock").write_text("123")
    return ckpts


def test_an_intact_run_has_no_findings(tmp_path):
    write_run(tmp_path)
    found = bench.check_tree(tmp_path)
    assert found.corrupt == [] and found.temps == []


def test_truncated_checkpoint_and_leftover_temps_are_flagged(tmp_path):
    ckpts = write_run(tmp_path)
    data = (ckpts / "step_0000002.pt").read_bytes()
    (ckpts / "step_0000004.pt").write_bytes(data[: len(data) // 2])  # a checkpoint cut short
    (ckpts / ".step_0000006.pt.k2j3h4.tmp").write_bytes(data[:100])  # a writer killed mid-write
    (tmp_path / "run" / ".shard_00001.tmp").mkdir()
    (tmp_path / "run" / ".shard_00001.tmp" / "ids.json").write_text("[")
    found = bench.check_tree(tmp_path)
    assert [Path(p).name for p, _ in found.corrupt] == ["step_0000004.pt"]
    assert sorted(Path(p).name for p in found.temps) == [".shard_00001.tmp", ".step_0000006.pt.k2j3h4.tmp"]


def test_damaged_files_of_every_kind_are_flagged(tmp_path):
    ckpts = write_run(tmp_path)
    data = bytearray((ckpts / "step_0000002.pt").read_bytes())
    data[len(data) // 3] ^= 0xFF  # one flipped byte: the file still unzips, only the checksum tells
    (ckpts / "step_0000002.pt").write_bytes(bytes(data))
    (ckpts / "latest").write_text("step_0000009.pt\n")
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    (tmp_path / "run" / "results.json").write_text('{"cer": 0.')
    reasons = dict((Path(p).name, why) for p, why in bench.check_tree(tmp_path).corrupt)
    assert set(reasons) == {"step_0000002.pt", "latest", "metrics.jsonl", "results.json"}
    assert "torn last line" in reasons["metrics.jsonl"] and "step_0000009.pt" in reasons["latest"]


def test_teacher_cache_shards_are_checked_against_the_manifest(tmp_path):
    shard = tmp_path / "cache" / "shard_00000"
    shard.mkdir(parents=True)
    payload = bytes(range(64))
    (shard / "image.pooled.bin").write_bytes(payload)
    record = {"bytes": 64, "blake2b": hashlib.blake2b(payload, digest_size=16).hexdigest()}
    manifest = {"format": bench.CACHE_FORMAT, "complete": True, "plan": {"num_shards": 1},
                "shards": [{"name": "shard_00000", "rows": 4, "files": {"image.pooled.bin": record}}]}
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps(manifest))
    assert bench.check_tree(tmp_path).corrupt == []
    (shard / "image.pooled.bin").write_bytes(payload[:-1] + b"\0")  # same size, other content
    assert [why for _, why in bench.check_tree(tmp_path).corrupt] == ["blake2b differs from the manifest's"]
    (shard / "image.pooled.bin").write_bytes(payload[:32])
    assert "32 bytes" in bench.check_tree(tmp_path).corrupt[0][1]


def test_state_differences_see_a_batchnorm_running_stat(tmp_path):
    ref = small_state()
    same = {"model": {k: v.clone() for k, v in ref["model"].items()}, "step": 2}
    assert bench.state_differences(same, ref) == []
    same["model"]["running_var"][1] += 1e-7
    assert bench.state_differences(same, ref) == ["model.running_var"]
    del same["model"]["num_batches_tracked"]
    assert "model.num_batches_tracked (only in the reference)" in bench.state_differences(same, ref)


def test_compare_distill_reads_the_final_checkpoints(tmp_path):
    for name in ("trial", "ref"):
        write_run(tmp_path / name)
    assert bench.compare_distill(tmp_path / "trial", tmp_path / "ref") == []
    other = small_state(2, seed=1)  # other running statistics
    save_checkpoint(other, tmp_path / "trial" / "run" / "checkpoints" / "step_0000002.pt")
    assert "model.running_mean" in bench.compare_distill(tmp_path / "trial", tmp_path / "ref")


def test_summary_table_counts_each_outcome():
    clean = bench.Findings()
    ok = bench.Trial("cache", 1.0, bench.Findings(temps=["x.tmp"]), "re-run", 0, clean, [])
    bad = bench.Trial("cache", 2.0, bench.Findings(corrupt=[("a.json", "JSONDecodeError")]), "re-run", 0,
                      bench.Findings(temps=["y.tmp"]), ["shards"])
    failed = bench.Trial("cache", 3.0, clean, "re-run", 1, clean, None)
    cmd = bench.Command("cache", "xmodal cache", None, None, None)
    row = bench.summarize(cmd, [ok, bad, failed])
    assert row == {"command": "xmodal cache", "kills": 3, "corrupt": 1, "temps_after_kill": 1,
                   "temps_after_recovery": 1, "finished": 2, "bit_exact": 1}
    assert "| xmodal cache | 3 | 1 | 1 | 1 | 2/3 | 1/3 |" in bench.table([row])
    lines = bench.failure_lines([ok, bad, failed])
    assert len(lines) == 2 and "a.json" in lines[0] and "shards" in lines[0] and "exited 1" in lines[1]
