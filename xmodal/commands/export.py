"""`xmodal export RUN --format open_clip`: turn a distilled student into a checkpoint other tools load directly."""

from __future__ import annotations

import argparse

from xmodal.commands import register_command
from xmodal.registry import Registry

# format → fn(run, out_dir, *, checkpoint, model_config, prefix, overwrite) -> Path; students register theirs
RUN_EXPORTERS: Registry = Registry("export format")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder (holds checkpoints/ and student_open_clip.json)")
    p.add_argument("--format", default="open_clip", help="export format (default: open_clip)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/export/FORMAT)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default: the newest in RUN/checkpoints)")
    p.add_argument("--model-config", default=None,
                   help="student open_clip config JSON (default: RUN/student_open_clip.json)")
    p.add_argument("--prefix", default=None,
                   help="state-dict prefix of the student model in the checkpoint, e.g. 'student.' "
                        "(default: found automatically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(args: argparse.Namespace) -> int:
    exporter = RUN_EXPORTERS.get(args.format)
    out = exporter(args.run, args.out, checkpoint=args.checkpoint, model_config=args.model_config,
                   prefix=args.prefix, overwrite=args.overwrite)
    print(f"exported to {out}")
    if args.format == "open_clip":
        print(f"load with: open_clip.create_model_and_transforms('local-dir:{out}')")
    return 0


register_command(
    "export", "export a distilled student (e.g. to an open_clip checkpoint)", configure, run,
    description="Export a run's student model. --format open_clip writes a folder that "
    "open_clip.create_model_and_transforms('local-dir:DIR') loads without xmodal.",
)
