"""`xmodal eval lipread`: CER/WER of a lip reader (or a speech recogniser) on an audio-visual manifest.

`--checkpoint` accepts a model file written by `save_recognizer` (e.g. `RUN/lipreader.pt` of the
`lipread_distill` job), an engine checkpoint of that job (`RUN/checkpoints/step_*.pt`), or a run folder (its
newest checkpoint). Preprocessing (crop size, normalisation) and the vocabulary come from the file when it
records them (an engine checkpoint records its config, so a sentencepiece `data.vocab` is read from that `.model`
file); `--crop-size`/`--resize` override. Every file goes through `load_checkpoint`: a damaged one is refused.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from xmodal.commands import register_command
from xmodal.errors import CheckpointError


def load_for_eval(path: str | os.PathLike) -> tuple[Any, dict]:
    """(recogniser in eval mode, meta with optional "vocab", "video", "audio") from a model file or checkpoint.

    Files are read by `load_checkpoint` (weights only, checksum verified when the file carries one), so a damaged
    training checkpoint is refused naming it instead of scored.
    """
    from xmodal.engine.checkpoint import CheckpointManager, load_checkpoint
    from xmodal.nn.recognizer import build_recognizer, load_recognizer

    path = Path(path)
    if path.is_dir():
        resolved = CheckpointManager(path).resolve(path)
        if resolved is None:
            raise CheckpointError(f"no checkpoint found in {path}")
        path = resolved
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    ckpt = load_checkpoint(path, training_only=False)
    if "kind" in ckpt:
        return load_recognizer(path, return_meta=True)
    if "step" in ckpt and isinstance(ckpt.get("config"), dict):
        from xmodal.tasks.lipread.job import MODEL_PREFIX, resolve_vocab

        cfg = ckpt["config"]
        if not isinstance(cfg.get("student"), dict) or not isinstance(cfg.get("data"), dict):
            raise CheckpointError(f"{path} is a training checkpoint of another job (no student/data config); "
                                  "give a lipread_distill checkpoint or a lipreader.pt model file")
        model = build_recognizer("lipreader", cfg["student"])
        state = {k[len(MODEL_PREFIX):]: v for k, v in ckpt["model"].items() if k.startswith(MODEL_PREFIX)}
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: the weights do not fit the student config stored with them: {e}") from e
        data = cfg["data"]
        vocab = resolve_vocab(data["vocab"], data.get("root")).to_dict() if "vocab" in data else None
        meta = {"video": data.get("video"), "vocab": vocab}
        return model.eval(), {k: v for k, v in meta.items() if v is not None}
    raise CheckpointError(f"{path}: neither a recogniser model file (keys kind/config/model) nor a "
                          "lipread_distill training checkpoint")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="model file, step_*.pt checkpoint or run folder")
    p.add_argument("--manifest", required=True, type=Path, help="JSON-lines manifest (id, video, audio, transcript)")
    p.add_argument("--decoder", choices=("greedy", "beam", "joint"), default="greedy",
                   help="greedy CTC, CTC prefix beam search, or joint CTC/attention beam search")
    p.add_argument("--beam-size", type=int, default=10)
    p.add_argument("--ctc-weight", type=float, default=0.3, help="joint decoding: weight λ of the CTC prefix score")
    p.add_argument("--modality", choices=("video", "audio"), default="video",
                   help="input of the model: lip video (lip reader) or log-mel audio (speech recogniser)")
    p.add_argument("--crop-size", type=int, default=None, help="override the video crop size")
    p.add_argument("--resize", type=int, default=None, help="override the video resize")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--output", type=Path, default=None, help="also write the metrics JSON here")
    p.add_argument("--examples", type=int, default=5, help="number of reference/hypothesis pairs to show")


def run(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from xmodal.config import from_dict
    from xmodal.data.av import AudioConfig, AVSpeechDataset, VideoConfig, collate_av, require_transcripts
    from xmodal.data.vocab import CharVocab, vocab_from_dict
    from xmodal.device import resolve_device
    from xmodal.io import atomic_write_json
    from xmodal.tasks.lipread.evaluate import evaluate_lipreading

    model, meta = load_for_eval(args.checkpoint)
    device = resolve_device(args.device)
    model.to(device)
    vocab = vocab_from_dict(meta["vocab"]) if meta.get("vocab") else CharVocab()
    video = audio = None
    if args.modality == "video":
        video = from_dict(VideoConfig, meta.get("video") or {}, source=f"{args.checkpoint} (video settings)")
        if args.crop_size is not None:
            video.crop_size = args.crop_size
        if args.resize is not None:
            video.resize = args.resize
    else:
        audio = from_dict(AudioConfig, meta.get("audio") or {}, source=f"{args.checkpoint} (audio settings)")
    ds = AVSpeechDataset(args.manifest, vocab, video=video, audio=audio, train=False, require_transcript=False)
    require_transcripts(ds.records, "CER/WER scoring")  # before decoding anything
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, collate_fn=collate_av)
    options: dict[str, Any] = {}
    if args.decoder in ("beam", "joint"):
        options["beam_size"] = args.beam_size
    if args.decoder == "joint":
        options["ctc_weight"] = args.ctc_weight
    result = evaluate_lipreading(model, loader, vocab, args.decoder, input_key=args.modality, device=device,
                                 max_batches=args.max_batches, num_examples=args.examples,
                                 source=f"manifest {args.manifest}", **options)
    result["checkpoint"], result["manifest"] = str(args.checkpoint), str(args.manifest)
    if args.output:
        atomic_write_json(args.output, result)
    for ex in result["examples"]:
        print(f"  {ex['id']}: ref {ex['ref']!r}\n  {' ' * len(str(ex['id']))}  hyp {ex['hyp']!r}")
    summary = {k: result[k] for k in ("cer", "wer", "num_utterances", "skipped", "decoder", "seconds")}
    print(json.dumps(summary))
    return 0


register_command(
    "eval lipread",
    "CER/WER of a lip reader (or speech recogniser) with greedy, beam or joint CTC/attention decoding",
    configure,
    run,
)
