"""Crash robustness: SIGKILL xmodal's long-running commands at random moments, check what each kill left behind,
recover the way a user would, and compare the recovered result with an uninterrupted run.

    python benchmarks/bench_kill.py                       # 20 kills per command (about 20 min on 2 cores)
    python benchmarks/bench_kill.py --kills 3 --no-report
    python benchmarks/bench_kill.py --quick               # 5 kills per command, one reference run each

Commands, on tiny configs written into the work folder (synthetic data, a few training steps, a checkpoint every
2 steps, OMP_NUM_THREADS=1 in every child; `--jobs` kills run side by side, each in its own folder):

- `distill-clip`: `xmodal distill clip.yaml`: trains the teacher in the job, then a half-size student. Recovered
  with `--resume latest` (a plain re-run when the kill came before the student's first checkpoint).
- `distill-lipread`: `xmodal distill lipread.yaml`: a speech teacher, then the BatchNorm lip reader; recovered
  the same way.
- `cache`: `xmodal cache clip.yaml --out cache`: trains the teacher, then stores its outputs in 16-sample
  shards; recovered by running it again.
- `eval-retrieval`: `xmodal eval retrieval --checkpoint <reference CLIP run> --data test.csv --cache-dir ...
  --out results.json`; recovered by running it again.

For every kill:

- corrupt: a file under its final name that does not load: step checkpoints (`load_checkpoint`, checksum
  verified), the `latest` pointer, other torch and safetensors files, JSON, every line of a JSON-lines log,
  YAML, .npy arrays, the shards a teacher cache's manifest records (sizes and blake2b), embedding-cache entries
  (shapes as recorded). Checked after the kill and again after recovery.
- temps: temporary files and folders (`.NAME.*.tmp`, `.NAME.tmp`, `.trash.*`), after the kill (a killed writer
  cannot clean up) and after recovery (there should be none). `.lock` files are flock locks, not counted.
- finished: the recovery command exits 0.
- reference: each command also runs uninterrupted twice (the second time in another folder); a difference
  between those two means bit-exact recovery cannot be expected (the command itself is not reproducible).
- bit-exact: distill: every tensor of the final checkpoint's model (weights and buffers, BatchNorm running
  statistics included) and loss state equals the uninterrupted reference run's; cache: the manifest's
  fingerprint, fields and shards (rows, sizes, checksums); eval: the metrics and the stored embeddings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

STEP_FILE = re.compile(r"^step_\d+\.pt$")
CACHE_FORMAT = "xmodal-teacher-cache"


# ---------------------------------------------------------------- checking what a kill left behind


def is_temp(name: str) -> bool:
    """Names of temporary files and folders of xmodal's atomic writers (`.NAME.*.tmp`, `.NAME.tmp`, `.trash.*`)."""
    return name.endswith(".tmp") or ".tmp." in name or name.startswith(".trash")


@dataclass
class Findings:
    """What `check_tree` found: files that do not load (path, reason) and leftover temporary files or folders."""

    corrupt: list[tuple[str, str]] = field(default_factory=list)
    temps: list[str] = field(default_factory=list)


def _check_checkpoint(path: Path) -> None:
    from xmodal.engine.checkpoint import load_checkpoint

    load_checkpoint(path)


def _check_torch(path: Path) -> None:
    import torch

    from xmodal.engine.checkpoint import verify_checkpoint

    verify_checkpoint(path)  # a checksum trailer, when the file has one
    torch.load(path, map_location="cpu", weights_only=True)


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            f.get_tensor(key)


def _check_json(path: Path) -> None:
    json.loads(path.read_text(encoding="utf-8"))


def _check_jsonl(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        raise ValueError("torn last line (no newline at the end)")
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except ValueError as e:
                raise ValueError(f"line {n}: {e}") from e


def _check_yaml(path: Path) -> None:
    import yaml

    yaml.safe_load(path.read_text(encoding="utf-8"))


def _check_npy(path: Path) -> None:
    import numpy as np

    np.load(path, mmap_mode="r")


def _check_latest(path: Path) -> None:
    name = path.read_text(encoding="utf-8").strip()
    if not name or not (path.parent / name).is_file():
        raise ValueError(f"names '{name}', which is not a file beside it")


def _check_teacher_cache(folder: Path, manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """Every shard the manifest records: its files exist with the recorded size and blake2b."""
    bad = []
    shards = manifest.get("shards", [])
    if manifest.get("complete") and len(shards) != manifest.get("plan", {}).get("num_shards", len(shards)):
        bad.append((str(folder / "manifest.json"), "marked complete but records fewer shards than planned"))
    for entry in shards:
        for name, rec in entry.get("files", {}).items():
            path = folder / entry["name"] / name
            if not path.is_file():
                bad.append((str(path), "recorded in the manifest but missing"))
                continue
            data = path.read_bytes()
            if len(data) != rec["bytes"]:
                bad.append((str(path), f"{len(data)} bytes, the manifest records {rec['bytes']}"))
            elif "blake2b" in rec:
                digest = hashlib.blake2b(data, digest_size=len(rec["blake2b"]) // 2).hexdigest()
                if digest != rec["blake2b"]:
                    bad.append((str(path), "blake2b differs from the manifest's"))
    return bad


def _check_embedding_entry(folder: Path, meta: dict[str, Any]) -> list[tuple[str, str]]:
    import numpy as np

    bad = []
    for name, shape in meta.get("shapes", {}).items():
        path = folder / f"{name}.npy"
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            bad.append((str(path), f"{type(e).__name__}: {e}"))
            continue
        if list(arr.shape) != list(shape):
            bad.append((str(path), f"shape {list(arr.shape)}, meta.json records {list(shape)}"))
    return bad


FILE_CHECKS: list[tuple[Callable[[Path], bool], Callable[[Path], None]]] = [
    (lambda p: STEP_FILE.match(p.name) is not None, _check_checkpoint),
    (lambda p: p.name == "latest" and p.parent.name == "checkpoints", _check_latest),
    (lambda p: p.suffix in (".pt", ".pth", ".bin") and not _in_cache_shard(p), _check_torch),
    (lambda p: p.suffix == ".safetensors", _check_safetensors),
    (lambda p: p.suffix == ".json", _check_json),
    (lambda p: p.suffix == ".jsonl", _check_jsonl),
    (lambda p: p.suffix in (".yaml", ".yml"), _check_yaml),
    (lambda p: p.suffix == ".npy", _check_npy),
]


def _in_cache_shard(path: Path) -> bool:
    """Raw arrays of a teacher-cache shard (checked against the manifest, not as torch files)."""
    return path.parent.name.startswith("shard_") and (path.parent.parent / "manifest.json").is_file()


def check_tree(root: str | os.PathLike) -> Findings:
    """Every file under `root` that should load, loaded; every temporary file or folder, listed."""
    root = Path(root)
    found = Findings()
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        for d in list(dirs):
            if is_temp(d):
                found.temps.append(str(here / d))
                dirs.remove(d)  # a temp folder's contents are the temp
        for name in files:
            path = here / name
            if is_temp(name):
                found.temps.append(str(path))
                continue
            if name == ".lock":
                continue
            for applies, check in FILE_CHECKS:
                if applies(path):
                    try:
                        check(path)
                    except Exception as e:  # noqa: BLE001 - any failure to load is the finding
                        found.corrupt.append((str(path), f"{type(e).__name__}: {e}".splitlines()[0][:200]))
                    break
        if "manifest.json" in files:
            try:
                manifest = json.loads((here / "manifest.json").read_text(encoding="utf-8"))
            except ValueError:
                manifest = None  # already reported as corrupt JSON
            if isinstance(manifest, dict) and manifest.get("format") == CACHE_FORMAT:
                found.corrupt += _check_teacher_cache(here, manifest)
        if "meta.json" in files and any(f.endswith(".npy") for f in files):
            try:
                meta = json.loads((here / "meta.json").read_text(encoding="utf-8"))
            except ValueError:
                meta = None
            if isinstance(meta, dict):
                found.corrupt += _check_embedding_entry(here, meta)
    found.corrupt.sort()
    found.temps.sort()
    return found


# ---------------------------------------------------------------- comparing with the uninterrupted run


def state_differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Keys whose values differ between two nested state dicts (tensors must be bit-equal, dtype and shape too)."""
    import torch

    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            name = f"{prefix}{key}"
            if key not in a or key not in b:
                out.append(f"{name} (only in {'the reference' if key in b else 'the resumed run'})")
            else:
                out += state_differences(a[key], b[key], name + ".")
        return out
    name = prefix[:-1] if prefix.endswith(".") else prefix
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
        return [] if same else [name]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in state_differences(x, y, f"{name}[{i}].")]
    return [] if a == b else [name]


def final_checkpoint(run: Path) -> Path:
    ckpts = run / "checkpoints"
    return ckpts / (ckpts / "latest").read_text(encoding="utf-8").strip()


def compare_distill(trial: Path, ref: Path) -> list[str]:
    """The final checkpoint's step, model (weights and buffers) and loss state against the reference's."""
    from xmodal.engine.checkpoint import load_checkpoint

    a, b = load_checkpoint(final_checkpoint(trial / "run")), load_checkpoint(final_checkpoint(ref / "run"))
    diffs = [] if a["step"] == b["step"] else [f"step {a['step']} vs {b['step']}"]
    for key in ("model", "losses"):
        diffs += state_differences(a.get(key) or {}, b.get(key) or {}, f"{key}.")
    return diffs


def compare_cache(trial: Path, ref: Path) -> list[str]:
    """Fingerprint, fields, completeness and shard records (rows, sizes, checksums) of the two manifests."""
    a = json.loads((trial / "cache" / "manifest.json").read_text(encoding="utf-8"))
    b = json.loads((ref / "cache" / "manifest.json").read_text(encoding="utf-8"))
    return [key for key in ("fingerprint", "fields", "complete", "shards") if a.get(key) != b.get(key)]


def compare_eval(trial: Path, ref: Path) -> list[str]:
    """The metrics of results.json, and every embedding-cache entry's arrays."""
    import numpy as np

    a = json.loads((trial / "eval" / "results.json").read_text(encoding="utf-8"))
    b = json.loads((ref / "eval" / "results.json").read_text(encoding="utf-8"))
    diffs = [] if a["metrics"] == b["metrics"] else ["metrics"]

    def entries(root: Path) -> dict[str, Path]:
        return {p.parent.name: p.parent for p in (root / "eval" / "cache").rglob("meta.json")}

    ea, eb = entries(trial), entries(ref)
    if set(ea) != set(eb):
        diffs.append(f"embedding entries {sorted(ea)} vs {sorted(eb)}")
    for key in set(ea) & set(eb):
        for name in ("image", "text"):
            if not np.array_equal(np.load(ea[key] / f"{name}.npy"), np.load(eb[key] / f"{name}.npy")):
                diffs.append(f"embeddings {key}/{name}")
    return diffs


# ---------------------------------------------------------------- the commands and their tiny configs


SCENES = {"train": 128, "val": 16, "test": 160, "image_size": 32}  # the synthetic image-caption world

CLIP_CONFIG = """\
job: clip_distill
run_dir: {trial}/run
data:
  root: {data}/scenes
  synthetic: {{train: {train}, val: {val}, test: {test}, image_size: {image_size}}}
teacher:
  model_cfg:
    embed_dim: 32
    vision_cfg: {{image_size: 32, patch_size: 8, layers: 2, width: 64, head_width: 16}}
    text_cfg: {{context_length: 32, vocab_size: 49408, width: 32, heads: 2, layers: 2}}
  train: {{steps: 4, batch_size: 16, warmup_steps: 1, log_every: 1, ckpt_every: 2}}
student:
  shrink: {{vision: {{layers: 1, width: 0.5}}, text: {{layers: 1, width: 0.5}}}}
losses: [{{name: affinity}}, {{name: fd, weight: 0.5}}]
train: {{steps: 8, batch_size: 16, warmup_steps: 1, log_every: 1, ckpt_every: 2, eval_every: 0}}
eval: {{zeroshot: false}}
"""

LIPREAD_CONFIG = """\
job: lipread_distill
run_dir: {trial}/run
data:
  root: {data}/grid
  video: {{crop_size: 24, hflip_prob: 0.0, time_masks: 0}}
  audio: {{n_mels: 20}}
teacher:
  model: {{n_mels: 20, encoder: conformer, dim: 16, num_layers: 1, num_heads: 2, ffn_dim: 32, decoder_ffn_dim: 32,
          conv_kernel: 3, dropout: 0.0}}
  train: {{steps: 4, batch_size: 3, lr: 0.001, warmup_steps: 0, log_every: 1, eval_every: 0, ckpt_every: 2,
          seed: 0}}
student: {{width_mult: 0.0625, blocks: [1, 1, 1, 1], encoder: transformer, dim: 16, num_layers: 1, num_heads: 2,
          ffn_dim: 32, decoder_ffn_dim: 32, conv_kernel: 3, dropout: 0.0}}
losses:
  - {{name: ctc, weight: 0.3}}
  - {{name: attention_ce, weight: 0.7}}
  - {{name: libs, weight: 0.1, params: {{filter: hard, max_cer: 2.0}}}}
  - {{name: ctc_kd, weight: 0.1}}
train: {{steps: 12, batch_size: 3, lr: 0.001, warmup_steps: 0, log_every: 1, eval_every: 0, ckpt_every: 2,
        seed: 0}}
eval: {{decoder: greedy, batch_size: 3}}
"""


@dataclass
class Command:
    """One command under test: how to run it in the trial folder, how to recover, how to compare results."""

    key: str
    label: str
    run: Callable[[Path], list[str]]
    recover: Callable[[Path], tuple[str, list[str]]]  # (how, argv)
    compare: Callable[[Path, Path], list[str]]


def xmodal(*args: str) -> list[str]:
    return [sys.executable, "-m", "xmodal", *args]


def distill_recovery(config: Path) -> Callable[[Path], tuple[str, list[str]]]:
    def recover(trial: Path) -> tuple[str, list[str]]:
        run = trial / "run"
        if any(run.glob("checkpoints/step_*.pt")) or (run / "stages.json").is_file():
            return "resume", xmodal("distill", str(config), "--resume", "latest")
        return "re-run", xmodal("distill", str(config))
    return recover


def slot_folder(work: Path, slot: int) -> Path:
    """Trials run side by side, each in its own slot: `slot<N>/configs` and `slot<N>/trial`."""
    return work / f"slot{slot}"


def make_commands(work: Path, slot: int = 0) -> dict[str, Command]:
    here, data = slot_folder(work, slot), work / "data"
    trial, configs = here / "trial", here / "configs"
    clip, lip = configs / "clip.yaml", configs / "lipread.yaml"
    ref_clip_run = work / "ref" / "distill-clip" / "run"
    cache = xmodal("cache", str(clip), "--out", str(trial / "cache"), "--shard-size", "16", "--no-progress")
    evaluate = xmodal("eval", "retrieval", "--checkpoint", str(ref_clip_run),
                      "--data", str(data / "scenes" / "test.csv"), "--cache-dir", str(trial / "eval" / "cache"),
                      "--out", str(trial / "eval" / "results.json"),
                      "--batch-size", "8", "--device", "cpu", "--no-progress")
    return {
        "distill-clip": Command("distill-clip", "xmodal distill (CLIP)", lambda t: xmodal("distill", str(clip)),
                                distill_recovery(clip), compare_distill),
        "distill-lipread": Command("distill-lipread", "xmodal distill (lip reading)",
                                   lambda t: xmodal("distill", str(lip)), distill_recovery(lip), compare_distill),
        "cache": Command("cache", "xmodal cache", lambda t: cache, lambda t: ("re-run", cache), compare_cache),
        "eval-retrieval": Command("eval-retrieval", "xmodal eval retrieval", lambda t: evaluate,
                                  lambda t: ("re-run", evaluate), compare_eval),
    }


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def start(argv: list[str], out) -> subprocess.Popen:
    """A child in its own process group (so a kill reaches its workers too)."""
    return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT,
                            start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_to_end(argv: list[str], log: Path, timeout: float | None = None) -> tuple[int, float]:
    """Run a command to completion (output to `log`); (exit code, -1 on timeout; seconds)."""
    t0 = time.perf_counter()
    with open(log, "ab") as out:
        proc = start(argv, out)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = -1
        finally:
            kill_group(proc)  # on timeout, and when this script is interrupted
    return code, time.perf_counter() - t0


def has_files(root: Path) -> bool:
    return root.is_dir() and any(f for _, _, files in os.walk(root) for f in files if f != ".lock")


def run_and_watch(
    argv: list[str], log: Path, trial: Path, kill_after: float | None = None
) -> tuple[int | None, float, float | None]:
    """Run in its own process group; SIGKILL the group `kill_after` s after its first file appeared in `trial`
    (None: let it finish). Start-up time varies with machine load; the time spent writing varies less.

    Returns (exit code, or None when killed; seconds; when the first file appeared in `trial`).
    """
    first = None
    t0 = time.perf_counter()
    with open(log, "ab") as out:
        proc = start(argv, out)
        try:
            while proc.poll() is None:
                now = time.perf_counter() - t0
                if first is None and has_files(trial):
                    first = now
                if kill_after is not None and first is not None and now >= first + kill_after:
                    kill_group(proc)
                    return None, now, first
                time.sleep(0.02)
        finally:
            kill_group(proc)  # when this script is interrupted
    return proc.returncode, time.perf_counter() - t0, first


# ---------------------------------------------------------------- one kill, and the whole protocol


@dataclass
class Trial:
    command: str
    at: float  # seconds after the command's first file appeared
    after_kill: Findings
    how: str = ""
    code: int | None = None
    after_recovery: Findings | None = None
    differences: list[str] | None = None  # None: not compared (recovery failed)

    @property
    def corrupt(self) -> bool:
        return bool(self.after_kill.corrupt or (self.after_recovery and self.after_recovery.corrupt))

    @property
    def finished(self) -> bool:
        return self.code == 0

    @property
    def bit_exact(self) -> bool:
        return self.differences == []


@dataclass
class Reference:
    seconds: float
    first_write: float
    repeat_differences: list[str] | None = None  # a second uninterrupted run against the first (None: not run)


def fresh(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def reference_run(cmds: list[dict[str, Command]], key: str, work: Path, logs: Path, repeat: bool) -> Reference:
    """The uninterrupted run (in slot 0), moved to ref/<key>; with `repeat`, a second one (in the last slot, so
    another folder when there are several) compared with it."""
    cmd = cmds[0][key]
    trial, ref = slot_folder(work, 0) / "trial", work / "ref" / key
    fresh(trial)
    log = logs / f"{cmd.key}-reference.log"
    code, seconds, first = run_and_watch(cmd.run(trial), log, trial)
    if code != 0:
        raise SystemExit(f"the uninterrupted {cmd.label} run failed (exit {code}); see {log}")
    if ref.exists():
        shutil.rmtree(ref)
    ref.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(trial), str(ref))
    result = Reference(seconds, first if first is not None else 0.0)
    if repeat:
        cmd = cmds[-1][key]
        trial = slot_folder(work, len(cmds) - 1) / "trial"
        fresh(trial)
        code, _, _ = run_and_watch(cmd.run(trial), logs / f"{key}-reference2.log", trial)
        result.repeat_differences = cmd.compare(trial, ref) if code == 0 else [f"exit {code}"]
    return result


def kill_trial(cmd: Command, work: Path, slot: int, logs: Path, ref: Reference, fraction: float,
               index: int) -> Trial | None:
    """Start the command, SIGKILL it `fraction` of the way through its writing, check, recover, check, compare."""
    trial = slot_folder(work, slot) / "trial"
    log = logs / f"{cmd.key}-{index:03d}.log"
    writing = max(0.1, ref.seconds - ref.first_write)
    for _ in range(4):  # a run that finishes before its kill moment is tried again, earlier
        fresh(trial)
        code, at, first = run_and_watch(cmd.run(trial), log, trial, kill_after=fraction * writing)
        if code is None:
            break
        fraction *= 0.5
    else:
        return None
    result = Trial(cmd.key, at - first, check_tree(trial))
    result.how, argv = cmd.recover(trial)
    result.code, _ = run_to_end(argv, log, timeout=max(300.0, 10 * ref.seconds))
    result.after_recovery = check_tree(trial)
    if result.finished:
        try:
            result.differences = cmd.compare(trial, work / "ref" / cmd.key)
        except Exception as e:  # noqa: BLE001 - a missing or unreadable output is a difference
            result.differences = [f"cannot compare: {type(e).__name__}: {e}"]
    return result


def summarize(cmd: Command, trials: list[Trial]) -> dict[str, Any]:
    return {
        "command": cmd.label,
        "kills": len(trials),
        "corrupt": sum(t.corrupt for t in trials),
        "temps_after_kill": sum(bool(t.after_kill.temps) for t in trials),
        "temps_after_recovery": sum(bool(t.after_recovery and t.after_recovery.temps) for t in trials),
        "finished": sum(t.finished for t in trials),
        "bit_exact": sum(t.bit_exact for t in trials),
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| command | kills | corrupt | temps left after kill | temps left after recovery | recoveries finished "
            "| bit-exact |\n|---|---:|---:|---:|---:|---:|---:|\n")
    return head + "".join(
        f"| {r['command']} | {r['kills']} | {r['corrupt']} | {r['temps_after_kill']} | {r['temps_after_recovery']} "
        f"| {r['finished']}/{r['kills']} | {r['bit_exact']}/{r['kills']} |\n" for r in rows
    )


def failure_lines(trials: list[Trial], limit: int = 8) -> list[str]:
    """One line per kill that went wrong (at most `limit`), saying what."""
    lines = []
    for t in trials:
        what = []
        for stage, found in (("after the kill", t.after_kill), ("after recovery", t.after_recovery)):
            if found and found.corrupt:
                what.append(f"corrupt {stage}: " + "; ".join(f"{Path(p).name} ({why})" for p, why in found.corrupt[:3]))
        if t.after_recovery and t.after_recovery.temps:
            what.append("temps after recovery: " + ", ".join(Path(p).name for p in t.after_recovery.temps[:3]))
        if not t.finished:
            what.append(f"{t.how} exited {t.code}")
        elif t.differences:
            what.append("differs from the uninterrupted run: " + ", ".join(t.differences[:4])
                        + (f" (+{len(t.differences) - 4} more)" if len(t.differences) > 4 else ""))
        if what:
            lines.append(f"  - killed {t.at:.2f} s after its first file, {t.how}: " + "; ".join(what))
    return lines[:limit] + ([f"  - ... and {len(lines) - limit} more"] if len(lines) > limit else [])


def prepare(work: Path, logs: Path, slots: int) -> None:
    """Configs of every slot, the synthetic scenes (as the CLIP job would write them) and the lip-reading corpus."""
    from xmodal.data.scenes import generate_scene_dataset

    data = work / "data"
    for slot in range(slots):
        configs = slot_folder(work, slot) / "configs"
        configs.mkdir(parents=True, exist_ok=True)
        fmt = {"trial": slot_folder(work, slot) / "trial", "data": data, **SCENES}
        (configs / "clip.yaml").write_text(CLIP_CONFIG.format(**fmt))
        (configs / "lipread.yaml").write_text(LIPREAD_CONFIG.format(**fmt))
    generate_scene_dataset(data / "scenes", SCENES["train"], SCENES["val"], SCENES["test"],
                           image_size=SCENES["image_size"], progress=False)
    if not (data / "grid" / "train.jsonl").is_file():
        code, _ = run_to_end(xmodal("data", "synth-grid", "--out", str(data / "grid"), "--speakers", "3",
                                    "--utterances", "6", "--roi-size", "32", "--no-progress"), logs / "data.log")
        if code != 0:
            raise SystemExit(f"writing the synthetic lip-reading corpus failed; see {logs / 'data.log'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=None, help="kills per command (default 20; 5 with --quick)")
    ap.add_argument("--quick", action="store_true", help="5 kills per command and no repeated reference run")
    ap.add_argument("--commands", nargs="+", default=["distill-clip", "distill-lipread", "cache", "eval-retrieval"],
                    choices=["distill-clip", "distill-lipread", "cache", "eval-retrieval"])
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--jobs", type=int, default=2, help="kills run side by side, one core each (default 2)")
    ap.add_argument("--work", help="work folder (default: a new temporary folder, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, reference runs)")
    ap.add_argument("--no-report", action="store_true", help="print only; do not touch BENCHMARKS.md")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the running child is killed too
    kills = args.kills if args.kills is not None else (5 if args.quick else 20)
    if kills < 1 or args.jobs < 1:
        ap.error("--kills and --jobs must be at least 1")

    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="xmodal-bench-kill-"))
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    t_start = time.perf_counter()
    print(f"work folder: {work}", flush=True)
    prepare(work, logs, args.jobs)
    slots = [make_commands(work, slot) for slot in range(args.jobs)]
    commands = slots[0]
    wanted = [k for k in commands if k in args.commands]
    refs: dict[str, Reference] = {}
    for key in dict.fromkeys(["distill-clip", *wanted]):  # eval needs the reference CLIP run
        refs[key] = reference_run(slots, key, work, logs, repeat=not args.quick and key in wanted)
        r = refs[key]
        agree = "" if r.repeat_differences is None else (
            "; a second uninterrupted run agrees bit-exactly" if not r.repeat_differences
            else f"; a second uninterrupted run DIFFERS: {', '.join(r.repeat_differences[:4])}")
        print(f"{key}: uninterrupted run {r.seconds:.1f} s (first file at {r.first_write:.1f} s){agree}", flush=True)

    rows, details = [], []
    free: queue.Queue[int] = queue.Queue()
    for slot in range(args.jobs):
        free.put(slot)

    def one(key: str, i: int, fraction: float) -> Trial | None:
        slot = free.get()
        try:
            t = kill_trial(slots[slot][key], work, slot, logs, refs[key], fraction, i)
        finally:
            free.put(slot)
        if t is None:
            print(f"{key} {i + 1}/{kills}: finished before every kill moment; skipped", flush=True)
        else:
            state = "bit-exact" if t.bit_exact else ("finished, differs" if t.finished else f"exit {t.code}")
            print(f"{key} {i + 1}/{kills}: killed {t.at:.2f} s into writing; {len(t.after_kill.corrupt)} corrupt, "
                  f"{len(t.after_kill.temps)} temps; {t.how}: {state}; temps after: "
                  f"{len(t.after_recovery.temps) if t.after_recovery else '-'}", flush=True)
        return t

    for key in wanted:
        cmd = commands[key]
        fractions = [rng.random() for _ in range(kills)]  # drawn up front: the same moments whatever the order
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            done = list(pool.map(one, [key] * kills, range(kills), fractions))
        trials = [t for t in done if t is not None]
        rows.append(summarize(cmd, trials))
        bad = failure_lines(trials)
        if bad:
            details.append(f"- {cmd.label}:\n" + "\n".join(bad))
    minutes = (time.perf_counter() - t_start) / 60

    body = [table(rows)]
    body.append("Each kill: SIGKILL to the command's process group at a moment drawn uniformly over the time an "
                "uninterrupted run spends writing (counted from the first file it makes); then every file left "
                "behind is loaded (corrupt), temporary files are listed (after the kill, and after recovery), the "
                "run is recovered (`--resume latest`, or the same command again) and its result compared with the "
                "uninterrupted run's (bit-exact: final checkpoint weights and buffers, cache shards, retrieval "
                "metrics and embeddings).\n")
    for key in wanted:
        r = refs[key]
        agree = "not repeated" if r.repeat_differences is None else (
            "a second one agrees bit-exactly" if not r.repeat_differences
            else "a second one differs: " + ", ".join(r.repeat_differences[:4]))
        body.append(f"- {commands[key].label}: uninterrupted run {r.seconds:.1f} s; {agree}")
    if details:
        body.append("\nKills that went wrong:\n\n" + "\n".join(details))
    body.append(f"\n- wall time: {minutes:.1f} min with {args.jobs} kill(s) side by side; kill moments seeded with "
                f"{args.seed}")
    text = "\n".join(body) + "\n"
    print("\n" + text)
    if not args.no_report:
        from _report import write_section

        path = write_section("kill", "Crash robustness: SIGKILL at random moments", text)
        print(f"wrote {path}")
    if args.work is None and not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
