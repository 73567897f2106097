"""`xmodal data mouth-crops`: a tree of face videos + landmark files → the same tree of mouth-crop videos.

Every `<videos>/<rel>.mp4` with landmarks at `<landmarks>/<rel>.pkl` (auto_avsr's layout; .npy/.npz also read)
becomes `<out>/<rel>.mp4` with its audio track, and a `.txt` / `.wav` beside the video is copied too, so
`xmodal data manifest <out>` reads the result like the original corpus. Clips already written are kept (re-running
resumes); refused clips are listed by name with the reason, and in `<out>/mouth_crops.json`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from xmodal.commands import register_command

REPORT = "mouth_crops.json"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("videos", type=Path, help="folder of face videos (*.mp4, searched recursively)")
    p.add_argument("--out", required=True, type=Path, help="output folder (same layout as the input)")
    p.add_argument("--landmarks", type=Path, default=None,
                   help="folder mirroring the videos with per-clip landmarks (.pkl as auto_avsr writes, or .npy/.npz)")
    p.add_argument("--detector", default=None,
                   help="registered landmark detector for clips without a landmarks file")
    p.add_argument("--scheme", default="auto",
                   help="landmark scheme: ibug68, mediapipe478, mediapipe4 (default: by point count)")
    p.add_argument("--crop-size", type=int, default=96, help="crop side in pixels, even (default 96)")
    p.add_argument("--window", type=int, default=12, help="landmark smoothing window in frames (default 12)")
    p.add_argument("--max-missing", type=float, default=0.5,
                   help="refuse clips with more than this fraction of frames without landmarks (default 0.5)")
    p.add_argument("--overwrite", action="store_true", help="redo clips whose output already exists")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _copy_atomic(src: Path, dst: Path) -> None:
    from xmodal.io import atomic_write

    with src.open("rb") as f, atomic_write(dst, "wb") as g:
        shutil.copyfileobj(f, g)


def run(args: argparse.Namespace) -> int:
    from xmodal.data.mouth import (
        LANDMARK_DETECTORS,
        MouthCropConfig,
        detect_landmarks,
        find_landmarks,
        load_landmarks,
        write_mouth_clip,
    )
    from xmodal.errors import ConfigError, DataError
    from xmodal.io import atomic_write_json
    from xmodal.progress import progress as progress_bar

    cfg = MouthCropConfig(crop_size=args.crop_size, window=args.window, max_missing=args.max_missing,
                          scheme=args.scheme)
    if args.landmarks is None and args.detector is None:
        raise ConfigError("give --landmarks (a folder of landmark files) or --detector (a registered detector; "
                          f"registered: {', '.join(LANDMARK_DETECTORS.names()) or 'none'})")
    detector = LANDMARK_DETECTORS.build(args.detector) if args.detector else None
    if not args.videos.is_dir():
        raise DataError(f"video folder {args.videos} does not exist")
    out_root = args.out.resolve()
    videos = sorted(p for p in args.videos.rglob("*.mp4")
                    if not p.name.startswith(".") and out_root not in p.resolve().parents)
    if not videos:
        raise DataError(f"{args.videos}: no .mp4 files")
    written, kept, refused = 0, 0, {}
    for video in progress_bar(videos, desc="mouth crops", unit="clip", enabled=not args.no_progress):
        rel = video.relative_to(args.videos)
        out = args.out / rel
        if out.is_file() and not args.overwrite:
            kept += 1
            continue
        try:
            lm_file = find_landmarks(args.landmarks, rel) if args.landmarks is not None else None
            if lm_file is not None:
                landmarks = load_landmarks(lm_file)
            elif detector is not None:
                landmarks = detect_landmarks(video, detector)
            else:
                raise DataError(f"no landmarks file {(args.landmarks / rel).with_suffix('.pkl')} (or .npy/.npz)")
            write_mouth_clip(video, landmarks, out, cfg, clip=str(rel))
        except DataError as e:
            refused[str(rel)] = str(e)
            continue
        for suffix in (".txt", ".wav"):
            side = video.with_suffix(suffix)
            if side.is_file():
                _copy_atomic(side, out.with_suffix(suffix))
        written += 1
    atomic_write_json(args.out / REPORT, {"written": written, "already_done": kept, "refused": refused,
                                          "config": vars(cfg)})
    print(f"{args.out}: {written} clips written, {kept} already done, {len(refused)} refused "
          f"(report: {args.out / REPORT})")
    for name, why in refused.items():
        print(f"  refused {name}: {why}")
    return 0 if written + kept else 2


register_command(
    "data mouth-crops",
    "crop mouth regions from face videos with per-frame landmarks (audio kept)",
    configure,
    run,
)
