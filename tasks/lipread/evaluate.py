"""Evaluate a CTC/attention recogniser (lip reader or speech teacher) on a loader of batches: CER and WER.

A batch is a dict with the model's input (batch["video"] + batch["video_mask"] by default; pass
input_key="audio" for a speech recogniser), and references in batch["transcripts"] (strings) or
batch["targets"] (ids padded with -1). Samples whose normalised reference is empty have no transcript and
are left out of the scores (counted in `skipped`). Scores over no reference at all would be NaN: that is a
DataError naming the manifest, never a result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from xmodal.device import resolve_device
from xmodal.errors import DataError
from xmodal.tasks.lipread.decode import DECODERS, decode_batch
from xmodal.tasks.lipread.metrics import ErrorRates, normalize_text


def batch_references(batch: Mapping[str, Any], vocab: Any) -> list[str]:
    """Reference strings of a batch: batch["transcripts"], else the targets decoded with the vocabulary."""
    if batch.get("transcripts") is not None:
        return [t or "" for t in batch["transcripts"]]
    if batch.get("targets") is not None:
        return [vocab.decode(row) for row in batch["targets"].tolist()]
    raise DataError(f"evaluation needs batch['transcripts'] or batch['targets']; the batch has {', '.join(batch)}")


def loader_source(loader: Any) -> str:
    """The manifest a loader reads (its data set's records' source), for error messages."""
    records = getattr(getattr(loader, "dataset", None), "records", None)
    sources = sorted({getattr(r, "source", "?") for r in records}) if records else []
    return "manifest " + ", ".join(sources) if sources else "the evaluation data"


def check_scores(result: Mapping[str, Any], source: str, max_batches: int | None = None) -> None:
    """A DataError when there was nothing to score (no reference transcript) or a score is not finite."""
    seen = f"the first {max_batches} batches of " if max_batches is not None else ""
    if not result["num_utterances"]:
        raise DataError(f"no reference transcript to score in {seen}{source}: {result['skipped']} utterance(s), all "
                        "with an empty or missing 'transcript'; CER/WER need references (put each utterance's text "
                        "under 'transcript')")
    bad = [k for k in ("cer", "wer") if not math.isfinite(float(result[k]))]
    if bad:
        raise DataError(f"{' and '.join(k.upper() for k in bad)} on {seen}{source} is not a number "
                        f"({result['chars']} reference characters, {result['words']} words); check the transcripts")


@torch.no_grad()
def evaluate_lipreading(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    vocab: Any,
    decoder: str = "greedy",
    *,
    input_key: str = "video",
    mask_key: str | None = None,
    device: str | torch.device | None = None,
    max_batches: int | None = None,
    num_examples: int = 5,
    source: str | None = None,
    **decoder_options: Any,
) -> dict[str, Any]:
    """Decode every batch and score it: {"cer", "wer", "num_utterances", "skipped", "decoder", "examples", ...}.

    `decoder` is "greedy", "beam" (CTC prefix beam search) or "joint" (CTC/attention); options such as
    beam_size and ctc_weight pass through to the decoder. `source` names the data in errors (default: the
    loader's manifest); no reference to score is a DataError.
    """
    DECODERS.get(decoder)
    device = resolve_device(device or next(model.parameters()).device)
    mask_key = mask_key or f"{input_key}_mask"
    was_training = model.training
    model.eval()
    rates, examples, skipped, start = ErrorRates(), [], 0, time.perf_counter()
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            if input_key not in batch:
                raise DataError(f"evaluation reads batch['{input_key}'] but the batch has {', '.join(batch)}")
            x = batch[input_key].to(device)
            mask = batch.get(mask_key)
            hyps = decode_batch(model, x, None if mask is None else mask.to(device), decoder, **decoder_options)
            refs = batch_references(batch, vocab)
            ids = batch.get("ids") or [None] * len(refs)
            keep_r, keep_h = [], []
            for sid, ref, hyp in zip(ids, refs, hyps):
                if not normalize_text(ref):
                    skipped += 1
                    continue
                text = vocab.decode(hyp)
                keep_r.append(ref)
                keep_h.append(text)
                if len(examples) < num_examples:
                    examples.append({"id": sid, "ref": normalize_text(ref), "hyp": normalize_text(text)})
            rates.update(keep_r, keep_h)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    result = {**rates.summary(), "skipped": skipped, "decoder": decoder, "seconds": round(seconds, 3),
              "examples": examples}
    check_scores(result, source or loader_source(loader), max_batches)
    return result
