"""Lip-video decode throughput: decord vs PyAV on the same synthetic GRID mp4 files, side by side.

Generates a small synthetic GRID corpus (also timing the generator, s/utterance on one core), then decodes
every video to grayscale frames with both backends through `xmodal.data.av.decode_video`, alternating
which backend goes first on each pass, and reports frames per second.

    python benchmarks/bench_video_decode.py
    python benchmarks/bench_video_decode.py --roi-size 96 --speakers 4 --utterances 10 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def decode_all(paths: list[Path], backend: str, threads: int) -> tuple[int, float]:
    from xmodal.data.av import decode_video

    frames = 0
    start = time.perf_counter()
    for p in paths:
        frames += decode_video(p, backend, num_threads=threads).shape[0]
    return frames, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speakers", type=int, default=4)
    parser.add_argument("--utterances", type=int, default=10, help="per speaker")
    parser.add_argument("--roi-size", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5, help="decode passes over all files per backend")
    parser.add_argument("--threads", type=int, default=1, help="decoder threads for both backends")
    parser.add_argument("--corpus", type=Path, default=None, help="reuse/keep the corpus here (default: temp)")
    parser.add_argument("--no-report", action="store_true", help="print only; do not touch BENCHMARKS.md")
    args = parser.parse_args()

    from xmodal.data.grid import encode_video, make_speakers, synthesize_grid, synthesize_utterance

    # warm-up outside the timing: imports, eSpeak start-up, resampler kernel, encoder probe
    warm = synthesize_utterance(make_speakers(1)[0], ("bin", "blue", "at", "f", "two", "now"), seed=0,
                                roi_size=args.roi_size)
    encode_video(warm.frames, 25)

    with tempfile.TemporaryDirectory(prefix="xmodal-bench-") as tmp:
        out = args.corpus or Path(tmp) / "grid"
        n_utts = args.speakers * args.utterances
        fresh = not (out / "corpus.json").exists()
        start, cpu_start = time.perf_counter(), time.process_time()
        corpus = synthesize_grid(out, speakers=args.speakers, utterances=args.utterances, seed=0,
                                 roi_size=args.roi_size, progress=False)
        synth_s = (time.perf_counter() - start) / n_utts if fresh else None
        synth_cpu = (time.process_time() - cpu_start) / n_utts
        paths = sorted(out.glob("video/*/*.mp4"))

        decode_all(paths[:2], "decord", args.threads)  # warm-up: imports and first-open costs
        decode_all(paths[:2], "pyav", args.threads)
        totals = {"decord": [0, 0.0], "pyav": [0, 0.0]}
        for r in range(args.repeats):
            order = ("decord", "pyav") if r % 2 == 0 else ("pyav", "decord")
            for backend in order:
                frames, seconds = decode_all(paths, backend, args.threads)
                totals[backend][0] += frames
                totals[backend][1] += seconds

    fps = {b: f / s for b, (f, s) in totals.items()}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    frames_per_pass = totals["decord"][0] // args.repeats
    rows = "\n".join(
        f"| {name} | {len(paths)} | {totals[b][0] // args.repeats} | {totals[b][1] / args.repeats * 1000:.1f} | "
        f"{fps[b]:,.0f} |"
        for b, name in (("decord", "decord (`get_batch`, RGB → gray)"), ("pyav", "PyAV (`to_ndarray('gray')`)"))
    )
    body = (
        f"Synthetic GRID corpus (`synthetic-grid`, {corpus['generator']['video_codec']} mp4, "
        f"{args.roi_size}x{args.roi_size} gray, 25 fps): {len(paths)} files, {frames_per_pass} frames per pass, "
        f"{args.repeats} passes per backend, alternating order, {args.threads} decoder thread(s).\n\n"
        "| backend | files | frames/pass | ms/pass | frames/s |\n|---|---:|---:|---:|---:|\n"
        f"{rows}\n\n"
        f"decord vs PyAV: {fps['decord'] / fps['pyav']:.2f}x\n\n"
        f"Load average at the end of the run: {load:.1f} on {os.cpu_count()} cores (other work on the machine "
        "slows both backends alike; absolute numbers are lower bounds when it exceeds the core count).\n"
    )
    if synth_s is not None:
        body += (f"\nCorpus generation (eSpeak NG + mouth rendering + mp4/wav writing, one process): "
                 f"{synth_s:.3f} s/utterance wall clock, {synth_cpu:.3f} s/utterance CPU time, at "
                 f"{args.roi_size}x{args.roi_size}.\n")
    print(body)
    if not args.no_report:
        from _report import write_section

        path = write_section("video_decode", "Lip-video decoding: decord vs PyAV", body,
                             "python " + " ".join(["benchmarks/bench_video_decode.py", *sys.argv[1:]]))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
