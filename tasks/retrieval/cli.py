"""`xmodal eval retrieval`: encode an image-text data set with a model and report recall@k both ways."""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from xmodal.commands import register_command
from xmodal.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path(os.environ.get("XMODAL_CACHE", "~/.cache/xmodal")).expanduser() / "retrieval"


def configure(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("model (either --model [--pretrained] or --checkpoint)")
    src.add_argument("--model", help="open_clip model name (e.g. ViT-B-32), hf-hub:org/repo, or a local folder")
    src.add_argument("--pretrained", help="open_clip pretrained tag or a local checkpoint file")
    src.add_argument("--checkpoint", help="an xmodal run folder or checkpoint file")
    data = p.add_argument_group("data")
    data.add_argument("--data", required=True, help="CSV/TSV or JSON-lines image-text file (several captions per "
                      "image allowed), or a named set NAME:PATH: coco-karpathy:PATH or flickr30k-karpathy:PATH "
                      "(Karpathy's dataset_*.json, or the folder holding it and the images)")
    data.add_argument("--split", help="split of a named set (Karpathy: test (default), val, train (with restval), "
                      "restval)")
    data.add_argument("--image-root", help="folder holding a named set's images (default: the JSON's folder)")
    data.add_argument("--image-key", help="column/key holding image paths (default: filepath, image, ...)")
    data.add_argument("--caption-key", help="column/key holding captions (default: title, caption(s), text)")
    data.add_argument("--sep", help="field separator of a delimited file (default: from the extension)")
    data.add_argument("--dataset", help="data set name written to the results (default: the file's stem, or the "
                      "named set and split, e.g. coco-karpathy/test)")
    run = p.add_argument_group("encoding")
    run.add_argument("--batch-size", type=int, default=64, help="images per batch (captions: 4x, at least 256)")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    run.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    run.add_argument("--num-workers", type=int, default=0, help="image loading worker processes")
    run.add_argument("--cache-dir", default=str(DEFAULT_CACHE),
                     help="embedding cache folder (reused while model and data are unchanged)")
    run.add_argument("--no-cache", action="store_true", help="encode without reading or writing the cache")
    ev = p.add_argument_group("evaluation")
    ev.add_argument("--index", default="flat", help="flat (exact, default), hnsw or ivfpq (approximate, faiss)")
    ev.add_argument("--index-param", action="append", default=[], metavar="KEY=VALUE",
                    help="index option, e.g. ef_search=256 or nprobe=64 (repeatable)")
    ev.add_argument("--target-recall", type=float, metavar="R",
                    help="approximate index: double efSearch (hnsw) or nprobe (ivfflat, ivfpq) until the index returns "
                    "this share of the exact top-max(ks) on 1,000 sampled queries; the value used and the recall "
                    "reached are reported, a target the cap misses is marked NOT MET (flat: ignored)")
    ev.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10], help="recall cut-offs")
    ev.add_argument("--ties", default="pessimistic", choices=("pessimistic", "optimistic"),
                    help="equal scores (e.g. a duplicate image or caption): pessimistic (default) ranks the "
                    "non-positive above the positive, optimistic below")
    ev.add_argument("--out", help="write results JSON (CLIP_benchmark shape) here, and a markdown table beside it")
    ev.add_argument("--language", default="en")
    ev.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _index_params(items: list[str]) -> dict:
    import yaml

    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--index-param expects KEY=VALUE, got '{item}'")
        params[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return params


def load_model(args: argparse.Namespace, device):
    """An object with model / preprocess / tokenizer / fingerprint from --model/--pretrained or --checkpoint."""
    if args.checkpoint and args.model:
        raise ConfigError("give either --checkpoint or --model [--pretrained], not both")
    if args.checkpoint:
        from xmodal.students.export import load_clip_checkpoint

        return load_clip_checkpoint(args.checkpoint, device=str(device))
    if not args.model:
        raise ConfigError("no model given: pass --model NAME [--pretrained TAG_OR_FILE] or --checkpoint PATH")
    from xmodal.teachers.clip import load_open_clip

    return load_open_clip(args.model, args.pretrained, device=str(device))


def run(args: argparse.Namespace) -> int:
    from xmodal.data.eval_sets import open_retrieval_set
    from xmodal.device import resolve_device
    from xmodal.io import atomic_write_json, atomic_write_text

    from .encode import encode_image_text
    from .evaluate import clip_benchmark_result, evaluate_retrieval, markdown_table
    from .search import INDEXES

    if args.index not in INDEXES:
        INDEXES.get(args.index)  # raises ConfigError with a suggestion
    params = _index_params(args.index_param)
    if params and args.index == "flat":
        raise ConfigError("--index-param applies to approximate indexes (hnsw, ivfpq), not to flat")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = resolve_device(args.device)
    data = open_retrieval_set(args.data, split=args.split, image_root=args.image_root, image_key=args.image_key,
                              caption_key=args.caption_key, sep=args.sep)
    loaded = load_model(args, device)
    t0 = time.perf_counter()
    emb = encode_image_text(
        loaded, data, cache_dir=None if args.no_cache else args.cache_dir, batch_size=args.batch_size,
        device=device, num_workers=args.num_workers, precision=args.precision, progress=not args.no_progress,
        image_key=args.image_key, caption_key=args.caption_key, sep=args.sep,
    )
    t1 = time.perf_counter()
    metrics = evaluate_retrieval(
        emb.image, emb.text, emb.text_to_image, args.ks, ties=args.ties, index=args.index, index_params=params,
        target_recall=args.target_recall, device=device, progress=not args.no_progress,
    )
    t2 = time.perf_counter()
    table = markdown_table(metrics)
    print(f"{data.name}: {len(emb.image_paths)} images, {len(emb.text_to_image)} captions "
          f"({'cached embeddings' if emb.from_cache else f'encoded in {t1 - t0:.1f} s'}; "
          f"search {args.index} in {t2 - t1:.2f} s)\n")
    print(table)
    if args.out:
        model_name = args.model or getattr(loaded, "name", None) or str(args.checkpoint)
        # CLIP_benchmark's `build` joins model and pretrained as strings: a folder or hub model without a tag is ""
        pretrained = (args.pretrained or "") if args.model else str(args.checkpoint)
        result = clip_benchmark_result(
            metrics, dataset=args.dataset or data.name, model=model_name, pretrained=pretrained,
            language=args.language,
            extra={
                "index": args.index,
                "ties": args.ties,
                "num_images": len(emb.image_paths),
                "num_texts": int(len(emb.text_to_image)),
                "data": data.source,
                **({"split": data.settings["split"]} if data.settings.get("split") else {}),
            },
        )
        out = Path(args.out)
        md = out.with_suffix(".md") if out.suffix != ".md" else out.with_name(out.name + ".table.md")
        atomic_write_json(out, result)
        atomic_write_text(md, table)
        print(f"wrote {out} and {md}")
    return 0


register_command(
    "eval retrieval",
    "image↔text recall@k, median/mean rank of a model on an image-text data set (exact or faiss)",
    configure,
    run,
)
