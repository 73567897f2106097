"""Mouth-crop throughput and peak memory: `xmodal data mouth-crops` on a synthetic 1280x720, 25 fps face clip.

Synthesises face clips of a few lengths (default 5 s and 10 s) with the moving face of tests/test_mouth.py drawn
at 720p over a textured, noisy background, an AAC audio track, and the exact 68-point landmarks as the `.pkl`
auto_avsr writes. Each measurement runs in a fresh Python process that reports its own wall time, CPU time and
peak RSS (VmHWM from /proc/self/status, reset through /proc/self/clear_refs after the imports and a warm-up clip,
so each peak belongs to one measurement); the command is called in-process there, so start-up is not timed.
Beside it, the same crop fed from the whole clip decoded at once into float32 [T, H, W] (the non-streaming way)
shows what streaming saves. The output is checked: one 96x96 crop per frame, on the mouth, audio kept.

    python benchmarks/bench_mouth_crops.py
    python benchmarks/bench_mouth_crops.py --seconds 2 4 --no-report
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SAMPLE_RATE = 16000
FACE_BOX = 448  # side of the square the face is drawn in, pixels
WARMUP_SECONDS = 0.4  # a short clip each process does once before the measured one


def _face_helpers():
    """The synthetic face of the mouth-crop tests (drawing, landmarks, pixel levels), reused as is."""
    sys.path.insert(0, str(ROOT / "tests"))
    import test_mouth

    return test_mouth


# ------------------------------------------------------------------------------------------------ synthesis


def face_pose(i: int, fps: float, width: int, height: int) -> np.ndarray:
    """Reference face → image similarity at frame i: a face ~300 px wide near the centre, swaying and nodding."""
    tm = _face_helpers()
    t = i / fps
    a = tm.similarity(1.45 + 0.08 * np.sin(2 * np.pi * t / 7.0), 0.12 * np.sin(2 * np.pi * t / 5.0), 0.0, 0.0)
    centre = np.array([width / 2 + 60 * np.sin(2 * np.pi * t / 6.0), height / 2 + 25 * np.sin(2 * np.pi * t / 4.0)])
    a[:, 2] = centre - a[:, :2] @ np.array([128.0, 150.0])  # the face oval's centre lands on `centre`
    return a


def speechlike(seconds: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 audio: a 140 Hz buzz with harmonics, amplitude-modulated at a syllable rate (~4 Hz)."""
    t = np.arange(int(round(seconds * rate))) / rate
    buzz = sum(np.sin(2 * np.pi * 140.0 * k * t) / k for k in range(1, 6))
    env = 0.5 * (1 + np.sin(2 * np.pi * 4.0 * t)) ** 2 / 4
    return (0.25 * buzz * env).astype(np.float32)


def synthesise(folder: Path, lengths: list[float], fps: int, width: int, height: int,
               seed: int = 0) -> dict[float, tuple[Path, Path, int]]:
    """One face clip (mp4 with AAC audio) and its landmarks (.pkl) per length, in `<folder>/<len>s/faces` and
    `<folder>/<len>s/landmarks`; frames are drawn once and streamed to every clip still running (one frame in
    memory). Returns {length: (video, landmarks, frames)}."""
    import av

    from xmodal.data.grid import pick_video_codec

    tm = _face_helpers()
    rng = np.random.default_rng(seed)
    coarse = rng.integers(30, 100, (height // 16 + 1, width // 16 + 1)).astype(np.uint8)
    texture = np.kron(coarse, np.ones((16, 16), np.uint8))[:height, :width]  # blocky wallpaper
    texture = (texture.astype(np.int16) + rng.integers(-12, 13, (height, width))).clip(0, 255).astype(np.uint8)
    can = tm.canonical("ibug68")
    clips = {}
    for seconds in lengths:
        d = folder / f"{seconds:g}s"
        (d / "faces").mkdir(parents=True, exist_ok=True)
        (d / "landmarks").mkdir(parents=True, exist_ok=True)
        n = int(round(seconds * fps))
        c = av.open(str(d / "faces" / "clip.mp4"), "w", format="mp4")
        vs = c.add_stream(pick_video_codec(), rate=fps)
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        vs.codec_context.thread_count = 1
        if vs.codec_context.name == "libx264":
            vs.options = {"preset": "veryfast", "crf": "23"}
        aus = c.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
        clips[seconds] = {"dir": d, "n": n, "c": c, "vs": vs, "as": aus, "audio": speechlike(n / fps), "lms": []}
    total = max(c["n"] for c in clips.values())
    for i in range(total):
        a = face_pose(i, fps, width, height)
        # draw only a box around the face (the oval spans < 420 px at this scale) and paste it on the wallpaper
        x0, y0 = (np.floor(a[:, 2] + a[:, :2] @ np.array([128.0, 150.0])) - FACE_BOX // 2).astype(int)
        x0, y0 = min(max(x0, 0), width - FACE_BOX), min(max(y0, 0), height - FACE_BOX)
        box = a.copy()
        box[:, 2] -= (x0, y0)
        face = tm.render(box, FACE_BOX, FACE_BOX)
        img = texture.copy()
        window = img[y0:y0 + FACE_BOX, x0:x0 + FACE_BOX]
        window[face != tm.BACKGROUND] = face[face != tm.BACKGROUND]
        img = (img.astype(np.int16) + rng.integers(-3, 4, img.shape, dtype=np.int16)).clip(0, 255).astype(np.uint8)
        lm = (can @ a[:, :2].T + a[:, 2]).astype(np.float32)  # auto_avsr stores float32 (x, y) per frame
        frame = av.VideoFrame.from_ndarray(img, format="gray").reformat(format="yuv420p")
        frame.pts = i
        hop = SAMPLE_RATE // fps
        for clip in clips.values():
            if i < clip["n"]:  # the frame, then its stretch of audio: interleaved as recorders write
                clip["lms"].append(lm)
                for p in clip["vs"].encode(frame):
                    clip["c"].mux(p)
                af = av.AudioFrame.from_ndarray(clip["audio"][None, i * hop:(i + 1) * hop], format="fltp",
                                                layout="mono")
                af.sample_rate, af.pts = SAMPLE_RATE, i * hop
                for p in clip["as"].encode(af):
                    clip["c"].mux(p)
    out = {}
    for seconds, clip in clips.items():
        c, vs = clip["c"], clip["vs"]
        for stream in (vs, clip["as"]):
            for p in stream.encode():
                c.mux(p)
        c.close()
        lm_path = clip["dir"] / "landmarks" / "clip.pkl"
        lm_path.write_bytes(pickle.dumps(clip["lms"]))
        out[seconds] = (clip["dir"] / "faces" / "clip.mp4", lm_path, clip["n"])
    return out


# ------------------------------------------------------------------------------------------------ child side


def _status_kb(field: str) -> int:
    """A field of /proc/self/status in KiB: VmRSS (resident now) or VmHWM (peak resident since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise SystemExit(f"/proc/self/status has no {field}; this benchmark reads Linux process memory")


def _reset_peak() -> None:
    """Restart VmHWM from the current RSS (Linux), so the next peak belongs to what runs next."""
    Path("/proc/self/clear_refs").write_text("5")


def _run(mode: str, clip_dir: Path, out: Path) -> int:
    """Crop (or only decode) the clip in `clip_dir` one way; the number of frames done."""
    import xmodal.cli
    from xmodal.data.av import iter_gray_frames
    from xmodal.data.mouth import MouthCropConfig, crop_mouths, load_landmarks, prepare_transforms

    video, lm_file = clip_dir / "faces" / "clip.mp4", clip_dir / "landmarks" / "clip.pkl"
    if mode == "command":
        argv = ["data", "mouth-crops", str(clip_dir / "faces"), "--landmarks", str(clip_dir / "landmarks"),
                "--out", str(out), "--no-progress", "--overwrite"]
        with open(os.devnull, "w") as null:
            stdout, sys.stdout = sys.stdout, null
            try:
                rc = xmodal.cli.main(argv)
            finally:
                sys.stdout = stdout
        report = json.loads((out / "mouth_crops.json").read_text())
        if rc != 0 or report["written"] != 1:
            raise SystemExit(f"xmodal {' '.join(argv)} exited {rc}; refused: {report['refused']}")
        return len(load_landmarks(lm_file))
    if mode == "whole-clip":
        cfg = MouthCropConfig()
        transforms = prepare_transforms(load_landmarks(lm_file), cfg, "clip")
        hint, gray = iter_gray_frames(video, "pyav")
        clip = None
        for i, g in enumerate(gray):  # the whole clip as float32 [T, H, W] before any crop
            if clip is None:
                clip = np.empty((hint or len(transforms), *g.shape), np.float32)
            clip[i] = g
        return np.stack(list(crop_mouths(clip, transforms, cfg, "clip"))).shape[0]
    if mode.startswith("decode-"):  # decode + gray only, one frame at a time: the floor under any crop
        _, gray = iter_gray_frames(video, mode.split("-", 1)[1])
        return sum(1 for _ in gray)
    raise SystemExit(f"unknown mode {mode!r}")


def child(mode: str, clip_dir: Path, warm_dir: Path, out: Path, runs: int) -> dict:
    """One measurement in this (fresh) process: the command's start-up, then, after a warm-up on a short clip,
    the clip in `clip_dir` done one way `runs` times: the least wall and CPU time of a run, the peak RSS of all."""
    import av  # noqa: F401
    import torch  # noqa: F401

    import xmodal.cli

    start = time.perf_counter()
    xmodal.cli.build_parser()  # what every `xmodal` command does first: import plugins, build the parser
    startup = time.perf_counter() - start
    _run(mode, warm_dir, out.with_name(out.name + "-warm"))  # first-use costs: lazy imports, codec probes
    base = _status_kb("VmRSS")
    _reset_peak()
    walls, cpus = [], []
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.process_time()
        frames = _run(mode, clip_dir, out)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    wall, cpu = min(walls), min(cpus)  # other work on the machine only ever adds time
    return {"mode": mode, "frames": frames, "wall_s": wall, "cpu_s": cpu, "startup_s": startup, "runs": runs,
            "peak_kb": _status_kb("VmHWM"), "base_kb": base}


def measure(mode: str, clip_dir: Path, warm_dir: Path, out: Path, runs: int) -> dict:
    """Run `child` in a fresh interpreter and return what it measured."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, str(clip_dir), str(warm_dir), str(out),
           str(runs)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if res.returncode != 0:
        raise SystemExit(f"{mode} on {clip_dir} failed:\n{res.stdout}\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def check_output(out: Path, frames: int) -> None:
    """The written crop video: one 96x96 frame per input frame, the mouth in the middle, an audio track."""
    import av

    from xmodal.data.av import decode_video

    tm = _face_helpers()
    video = out / "clip.mp4"
    crops = decode_video(video, "pyav")
    if crops.shape != (frames, 96, 96):
        raise SystemExit(f"{video}: crops of shape {crops.shape}, expected ({frames}, 96, 96)")
    for k in (0, frames // 2, frames - 1):
        tm.assert_on_mouth(crops[k], band=(3, 12))  # the background noise blurs the mouth's edge a little
    with av.open(str(video)) as c:
        if not c.streams.audio:
            raise SystemExit(f"{video}: the audio track was not kept")


# ------------------------------------------------------------------------------------------------ report


def mib(kb: float) -> str:
    return f"{kb / 1024:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, nargs="+", default=[5.0, 10.0], help="clip lengths")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--no-whole-clip", action="store_true", help="skip the whole-clip float32 comparison")
    parser.add_argument("--no-report", action="store_true", help="print only; do not touch BENCHMARKS.md")
    parser.add_argument("--repeats", type=int, default=5,
                        help="runs per process of the fast rows (the command, PyAV decode); the least time is reported")
    parser.add_argument("--child", nargs=5, metavar=("MODE", "CLIP_DIR", "WARM_DIR", "OUT", "RUNS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, clip_dir, warm_dir, out, runs = args.child
        print(json.dumps(child(mode, Path(clip_dir), Path(warm_dir), Path(out), int(runs))))
        return

    lengths = sorted(set(args.seconds))
    warm = WARMUP_SECONDS
    with tempfile.TemporaryDirectory(prefix="xmodal-bench-mouth-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        clips = synthesise(tmp / "clips", sorted({*lengths, warm}), args.fps, args.width, args.height)
        synth_s = time.perf_counter() - start
        warm_dir = clips[warm][0].parent.parent
        longest = lengths[-1]
        bitrate = clips[longest][0].stat().st_size * 8 / longest / 1e6
        print(f"synthesised {len(clips)} clips in {synth_s:.1f} s ({bitrate:.1f} Mbit/s at {longest:g} s)", flush=True)

        results: dict[tuple[str, float], dict] = {}
        modes = ["command"] + ([] if args.no_whole_clip else ["whole-clip"]) + ["decode-pyav", "decode-decord"]
        for mode, seconds in [(m, sec) for m in modes for sec in lengths]:
          out = tmp / "out" / f"{mode}-{seconds:g}s"
          runs = args.repeats if mode in ("command", "decode-pyav") else 1  # the slow rows are there for memory
          r = measure(mode, clips[seconds][0].parent.parent, warm_dir, out, runs)
          if r["frames"] != clips[seconds][2]:
              raise SystemExit(f"{mode} at {seconds:g} s did {r['frames']} of {clips[seconds][2]} frames")
          if mode == "command":
              check_output(out, clips[seconds][2])
          results[mode, seconds] = r
          print(f"{mode:>13} {seconds:>4g} s: {r['frames'] / r['wall_s']:6.1f} frames/s wall, "
                f"{r['frames'] / r['cpu_s']:6.1f} frames/CPU-s, peak {mib(r['peak_kb'] - r['base_kb'])} MiB "
                f"above the warm process ({mib(r['peak_kb'])} MiB RSS)", flush=True)

    load = os.getloadavg()[0]
    names = {"command": "`xmodal data mouth-crops` (PyAV, streaming)",
             "whole-clip": "whole clip decoded to float32 [T, H, W], then cropped (no encode)",
             "decode-pyav": "decode + gray only, PyAV, one frame at a time",
             "decode-decord": "decode + gray only, decord, one frame at a time"}
    rows = "\n".join(
        f"| {names[mode]} | {seconds:g} | {r['frames']} | {r['runs']} | {r['wall_s']:.2f} | "
        f"{r['frames'] / r['wall_s']:.1f} | {r['frames'] / r['cpu_s']:.1f} | {mib(r['peak_kb'] - r['base_kb'])} | "
        f"{mib(r['peak_kb'])} |"
        for (mode, seconds), r in results.items()
    )
    cmd = {s: results["command", s] for s in lengths}
    above = {s: r["peak_kb"] - r["base_kb"] for s, r in cmd.items()}
    top = cmd[longest]
    startup = [r["startup_s"] for r in results.values()]
    lines = [
        f"Synthetic face clips: {args.width}x{args.height}, {args.fps} fps, libx264 (veryfast, crf 23; "
        f"{bitrate:.1f} Mbit/s at {longest:g} s), 16 kHz AAC audio interleaved; the moving face of the mouth-crop "
        "tests drawn ~300 px wide over a textured, noisy background, with its exact 68-point landmarks as an "
        "auto_avsr `.pkl`. Crop 96x96, smoothing window 12, one clip per run.",
        "",
        "Each row is one fresh Python process: it imports, builds the `xmodal` parser (which loads the plugins), "
        f"does the same path once on a {warm:g} s warm-up clip (lazy imports, codec probes), then resets its peak "
        "RSS (`/proc/self/clear_refs`) and does the measured clip `runs` times (times: the least of the runs; "
        "peak: over all runs). The command runs in-process through `xmodal.cli.main`. Peak is VmHWM from "
        "/proc/self/status after that reset: \"above warm\" is that peak minus the RSS just before the measured "
        "clip (what the clip costs), \"peak RSS\" the peak itself (whole process). CPU time is the process's, all "
        "threads.",
        "",
        "| path | clip s | frames | runs | wall s | frames/s wall | frames/CPU-s | peak above warm MiB "
        "| peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        rows,
        "",
        f"mouth-crop throughput ({longest:g} s clip): {top['frames'] / top['wall_s']:.1f} frames/s wall, "
        f"{top['frames'] / top['cpu_s']:.1f} frames per CPU-second, "
        f"{top['frames'] / top['wall_s'] / args.fps:.2f}x real time",
        f"streaming peak above warm, {longest:g} s vs {lengths[0]:g} s clip: "
        f"{above[longest] / max(above[lengths[0]], 1):.2f}x ({mib(above[longest])} vs {mib(above[lengths[0]])} MiB; "
        f"clip length {longest / lengths[0]:.2f}x)",
    ]
    if not args.no_whole_clip:
        whole = results["whole-clip", longest]
        float32_mib = top["frames"] * args.width * args.height * 4 / 2**20
        lines.append(f"streaming vs whole-clip peak memory above warm ({longest:g} s clip): "
                     f"{above[longest] / (whole['peak_kb'] - whole['base_kb']):.3f}x "
                     f"({mib(above[longest])} vs {mib(whole['peak_kb'] - whole['base_kb'])} MiB; the float32 clip "
                     f"alone is {float32_mib:,.0f} MiB); whole process: {top['peak_kb'] / whole['peak_kb']:.2f}x")
    dec = results["decode-pyav", longest]
    dd = {sec: results["decode-decord", sec]["peak_kb"] - results["decode-decord", sec]["base_kb"] for sec in lengths}
    lines += [
        f"PyAV decode + gray alone vs the whole command, CPU time ({longest:g} s clip): "
        f"{dec['cpu_s'] / top['cpu_s']:.2f}x (rows from separate processes agree only to ~20% on a loaded "
        "machine: decoding the 720p frames to gray is nearly all of the command's cost; the 96x96 crop, its "
        "encode and the audio copy add ~2 ms a frame in a profile)",
        f"decord vs PyAV decode + gray, frames/s ({longest:g} s clip): "
        f"{dec['wall_s'] / results['decode-decord', longest]['wall_s']:.2f}x",
        f"decord decode + gray peak above warm, {longest:g} s vs {lengths[0]:g} s clip: "
        f"{dd[longest] / max(dd[lengths[0]], 1):.2f}x ({mib(dd[longest])} vs {mib(dd[lengths[0]])} MiB)",
        "",
        "The command has one decode backend, PyAV (it demuxes audio and video together to copy the audio track "
        "unchanged); the decode-only rows show what each backend costs for the frames alone. decord's "
        "`VideoReader.next()` decodes ahead of a consumer slower than it (here, the gray conversion) and keeps the "
        "frames it has decoded, so decord's peak grows with the clip (about one 720p yuv420p frame, 1.3 MiB, per "
        "frame read ahead); PyAV's does not.",
        "",
        f"`xmodal` start-up before any clip (imports the plugins, e.g. torchvision and torch._dynamo through the "
        f"lip-reader student): {min(startup):.1f}-{max(startup):.1f} s per process, paid once per command, not "
        "per clip, and not in any figure above.",
        "",
        f"Load average at the end of the run: {load:.1f} on {os.cpu_count()} cores (other work on the machine "
        "slows every row alike; absolute throughput is a lower bound when it exceeds the core count). "
        f"Clip synthesis took {synth_s:.0f} s and is not part of any figure.",
    ]
    body = "\n".join(lines) + "\n"
    print(body)
    if not args.no_report:
        from _report import write_section

        path = write_section("mouth_crops", "Mouth crops: throughput and peak memory at 720p", body,
                             "OMP_NUM_THREADS=1 python " + " ".join(["benchmarks/bench_mouth_crops.py", *sys.argv[1:]]))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
