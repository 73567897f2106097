"""`xmodal eval detection`: mAP/NDS (nuScenes rules) of a BEV detector on a folder of scenes.

`--model` accepts a detector file (`bev_detector.pt`, written by the `bev_distill` job or `save_detector`) or a
run folder holding one. The scenes are read on the detector's own grid and must carry its classes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from xmodal.commands import register_command
from xmodal.errors import CheckpointError


def resolve_model_file(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        if not (p / "bev_detector.pt").is_file():
            raise CheckpointError(f"{p} holds no bev_detector.pt; give a run folder of the bev_distill job or a "
                                  "detector file")
        p = p / "bev_detector.pt"
    return p


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="detector file or bev_distill run folder")
    p.add_argument("--data", required=True, help="scene folder (e.g. written by `xmodal data synth-bev`)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None, help="score only the first N batches")
    p.add_argument("--top-k", type=int, default=None, help="detections kept per scene before NMS (default 50)")
    p.add_argument("--score-threshold", type=float, default=None, help="lowest detection score kept (default 0.1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", default=None, help="write the full results as JSON here")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from torch.utils.data import DataLoader

    from xmodal.data.bev import BEVSceneDataset
    from xmodal.device import resolve_device
    from xmodal.errors import DataError
    from xmodal.io import atomic_write_json
    from xmodal.nn.bev import DecodeConfig, load_detector
    from xmodal.tasks.bev.evaluate import evaluate_detection

    device = resolve_device(args.device)
    model = load_detector(resolve_model_file(args.model), map_location=device)
    ds = BEVSceneDataset(args.data, model.grid)
    classes = tuple(ds.info.get("classes", ds.classes))
    if classes != tuple(model.config.classes):
        raise DataError(f"{args.data} has classes {list(classes)} but the detector predicts "
                        f"{list(model.config.classes)}")
    decode = DecodeConfig()
    if args.top_k is not None:
        decode = dataclasses.replace(decode, top_k=args.top_k)
    if args.score_threshold is not None:
        decode = dataclasses.replace(decode, score_threshold=args.score_threshold)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, collate_fn=ds.collate)
    m = evaluate_detection(model, loader, model.config.classes, decode=decode, device=device,
                           max_batches=args.max_batches)
    print(f"{m['scenes']} scenes: mAP {m['mAP']:.4f}  NDS {m['NDS']:.4f}  mATE {m['mATE']:.3f}  "
          f"mASE {m['mASE']:.3f}  mAOE {m['mAOE']:.3f}")
    for name, e in m["per_class"].items():
        if e["mean_AP"] is None:
            print(f"  {name:<11} no ground truth ({e['predictions']} predictions)")
        else:
            aps = " ".join(f"{d}m {v:.3f}" for d, v in e["AP"].items())
            print(f"  {name:<11} AP {e['mean_AP']:.4f} ({aps})  gt {e['gt_boxes']}")
    print(f"  {m['nds_formula']}")
    if args.out:
        atomic_write_json(args.out, m)
        print(f"  results: {args.out}")
    return 0


register_command("eval detection", "mAP/NDS of a BEV detector on a scene folder (nuScenes rules)", configure, run)
