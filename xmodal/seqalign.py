"""Sequence alignment: map teacher (audio) sequences onto the student's (video) time axis, with padding masks.

Audio and video run at different frame rates, so a frame-level loss first needs, for every real video
frame j, a teacher vector ã_j. Every operator here takes teacher values [B, Ta, C] with a bool mask
[B, Ta] (True = real frame) plus the student's mask [B, Tv], and returns `Aligned(values [B, Tv, C'],
mask [B, Tv])`; aligned values at padded video frames are zero and the mask is False there.

Operators (all registered in `ALIGNERS`, so configs pick one by name):

- `rate_stack` ("rate_stack"): when the audio rate is k times the video rate, average (or concatenate)
  the k audio frames of each video frame. Rates that do not divide raise an error naming both.
- `attention_align` ("attention"): LIBS soft alignment `ã_j = Σ_i softmax_i(⟨h^v_j, h^a_i⟩/√d)·h^a_i`,
  with audio padding masked to -inf.
- `ctc_posterior_align` ("ctc"): segment the audio frames by the teacher's CTC best path (one segment per
  run of equal labels: each emitted token's run and each blank gap), average the teacher values over each
  segment, and give every video frame the segment found at the same relative time within its utterance.
  Relative time is used rather than the student's own CTC segmentation because it needs nothing from the
  student, whose CTC path is unreliable early in training; the segmentation still comes from the teacher's
  posteriors, so each video frame is matched to a whole token rather than to a single, jittery audio frame.
- `time_resample` ("time"): relative-time area resampling; each video frame averages the audio frames
  that fall inside it (or takes the nearest one when video is the faster stream). Used for posteriors.
- "identity": sequences that already share a time axis (e.g. decoder steps over the same transcript).

Masks must be prefix masks (real frames first, padding last) for every operator except attention.
The module also holds the CTC best-path helpers shared by the losses, adapters and decoders.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from xmodal.features import Features
from xmodal.registry import Registry

IGNORE_ID = -1


class Aligned(NamedTuple):
    """Teacher values on the student's time axis: values [B, Tv, C] and bool mask [B, Tv]."""

    values: Tensor
    mask: Tensor


class RateMismatchError(ValueError):
    """Audio and video frame rates are not integer multiples; rate stacking cannot align them."""


# ---------------------------------------------------------------- masks


def lengths_to_mask(lengths: Tensor, max_len: int | None = None) -> Tensor:
    """Prefix mask [B, T] (True = real) from lengths [B]."""
    max_len = int(lengths.max().item()) if max_len is None and lengths.numel() else (max_len or 0)
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def _check_mask(mask: Tensor | None, values: Tensor, name: str, *, prefix: bool = True) -> Tensor:
    """Default to all-True; check shape, dtype and (optionally) that padding comes last."""
    if mask is None:
        return torch.ones(values.shape[:2], dtype=torch.bool, device=values.device)
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(values.shape[:2]):
        raise ValueError(
            f"{name} must be a bool [B, T] mask matching values {list(values.shape[:2])}, "
            f"got {mask.dtype} {list(mask.shape)}"
        )
    if prefix and not torch.equal(mask, lengths_to_mask(mask.sum(1), mask.shape[1])):
        raise ValueError(f"{name} must be a prefix mask (real frames first, padding last)")
    return mask


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over real time steps: values [B, T, C], mask [B, T] → [B, C] (zero for empty samples)."""
    m = mask.to(values.dtype).unsqueeze(-1)
    return (values * m).sum(1) / m.sum(1).clamp_min(1.0)


def _zero_padding(values: Tensor, mask: Tensor) -> Aligned:
    return Aligned(values.masked_fill(~mask.unsqueeze(-1), 0.0), mask)


# ---------------------------------------------------------------- rate stacking


def infer_rate_ratio(
    audio_mask: Tensor,
    video_mask: Tensor,
    *,
    ratio: int | None = None,
    audio_rate: float | None = None,
    video_rate: float | None = None,
    tolerance: float = 1.0,
) -> int:
    """Audio frames per video frame k; from `ratio`, from `audio_rate / video_rate`, or from the lengths.

    Each sample's audio length must be within `tolerance` video frames of k·(video length).
    """
    la, lv = audio_mask.sum(1), video_mask.sum(1)
    if ratio is None and (audio_rate is not None or video_rate is not None):
        if audio_rate is None or video_rate is None:
            raise RateMismatchError("rate_stack: give both audio_rate and video_rate (frames per second), or neither")
        r = audio_rate / video_rate
        if r < 1 or abs(r - round(r)) > 1e-6:
            raise RateMismatchError(
                f"rate_stack: audio rate {audio_rate:g} fps is not an integer multiple of video rate "
                f"{video_rate:g} fps (ratio {r:.4g}); use the 'attention', 'ctc' or 'time' aligner instead"
            )
        ratio = round(r)
    if ratio is None:
        has = lv > 0
        if not bool(has.any()):
            return 1
        ratios = la[has].double() / lv[has].double()
        ratio = max(1, round(float(ratios.max())))
    if ratio < 1:
        raise RateMismatchError(f"rate_stack: ratio must be a positive integer, got {ratio}")
    off = (la - ratio * lv).abs()
    bad = (off > ratio * tolerance).nonzero().flatten()
    if bad.numel():
        b = int(bad[0])
        a_n, v_n = int(la[b]), int(lv[b])
        actual = f"{a_n / v_n:.4g}" if v_n else "inf"
        raise RateMismatchError(
            f"rate_stack: sample {b} has {a_n} audio frames and {v_n} video frames (ratio {actual}), which is "
            f"not {ratio} audio frames per video frame; the audio and video rates do not divide. Use the "
            "'attention', 'ctc' or 'time' aligner, or resample one stream"
        )
    return int(ratio)


def rate_stack(
    audio: Tensor,
    audio_mask: Tensor | None,
    video_mask: Tensor,
    *,
    ratio: int | None = None,
    mode: Literal["mean", "concat"] = "mean",
    audio_rate: float | None = None,
    video_rate: float | None = None,
    tolerance: float = 1.0,
) -> Aligned:
    """Group k = Ta/Tv consecutive audio frames per video frame: their masked mean [B, Tv, D] or concatenation
    [B, Tv, k·D] (padded audio frames contribute zeros). Audio is padded or trimmed to k·Tv frames."""
    if mode not in ("mean", "concat"):
        raise ValueError(f"rate_stack: mode must be 'mean' or 'concat', got '{mode}'")
    audio_mask = _check_mask(audio_mask, audio, "audio_mask")
    video_mask = _check_mask(video_mask, video_mask.unsqueeze(-1), "video_mask")
    k = infer_rate_ratio(
        audio_mask, video_mask, ratio=ratio, audio_rate=audio_rate, video_rate=video_rate, tolerance=tolerance
    )
    b, ta, d = audio.shape
    tv = video_mask.shape[1]
    need = k * tv
    x = audio.masked_fill(~audio_mask.unsqueeze(-1), 0.0)
    m = audio_mask
    if ta < need:
        x = torch.cat([x, x.new_zeros(b, need - ta, d)], dim=1)
        m = torch.cat([m, m.new_zeros(b, need - ta)], dim=1)
    x, m = x[:, :need].reshape(b, tv, k, d), m[:, :need].reshape(b, tv, k)
    count = m.sum(-1)
    out_mask = video_mask & (count > 0)
    if mode == "mean":
        out = x.sum(2) / count.clamp_min(1).unsqueeze(-1).to(x.dtype)
    else:
        out = x.reshape(b, tv, k * d)
    return _zero_padding(out, out_mask)


# ---------------------------------------------------------------- attention (LIBS)


def attention_weights(
    query: Tensor,
    key: Tensor,
    key_mask: Tensor | None = None,
    query_mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """softmax_i(⟨q_j, k_i⟩ / (√d·temperature)) over real keys → [B, Tq, Tk]; rows of padded queries (and of
    samples without any real key) are zero."""
    if query.shape[-1] != key.shape[-1] or query.shape[0] != key.shape[0]:
        raise ValueError(
            f"attention alignment needs query and key of equal batch and width, got query {list(query.shape)} "
            f"and key {list(key.shape)}; project both into the alignment space first"
        )
    key_mask = _check_mask(key_mask, key, "audio_mask", prefix=False)
    query_mask = _check_mask(query_mask, query, "video_mask", prefix=False)
    scores = torch.bmm(query, key.transpose(1, 2)) / (math.sqrt(query.shape[-1]) * temperature)
    has_key = key_mask.any(1)
    scores = scores.masked_fill(~key_mask[:, None, :], float("-inf"))
    scores = scores.masked_fill(~has_key[:, None, None], 0.0)  # avoid NaN rows; zeroed below
    weights = torch.softmax(scores, dim=-1)
    keep = (query_mask & has_key[:, None]).unsqueeze(-1) & key_mask[:, None, :]
    return weights * keep.to(weights.dtype)


def attention_align(
    query_video: Tensor,
    key_audio: Tensor,
    value_audio: Tensor | None = None,
    audio_mask: Tensor | None = None,
    video_mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> Aligned:
    """LIBS soft alignment: ã_j = Σ_i softmax_i(⟨h^v_j, h^a_i⟩/√d)·v_i (values default to the keys)."""
    value_audio = key_audio if value_audio is None else value_audio
    if value_audio.shape[:2] != key_audio.shape[:2]:
        raise ValueError(f"values {list(value_audio.shape)} and keys {list(key_audio.shape)} differ in [B, T]")
    w = attention_weights(query_video, key_audio, audio_mask, video_mask, temperature=temperature)
    video_mask = _check_mask(video_mask, query_video, "video_mask", prefix=False)
    out_mask = video_mask & _check_mask(audio_mask, key_audio, "audio_mask", prefix=False).any(1, keepdim=True)
    return _zero_padding(torch.bmm(w.to(value_audio.dtype), value_audio), out_mask)


# ---------------------------------------------------------------- relative time


def _relative_time_index(audio_len: Tensor, video_len: Tensor, tv: int) -> Tensor:
    """For each video frame j, the audio frame at the same relative time: ⌊(j+½)·La/Lv⌋ → [B, Tv]."""
    j = torch.arange(tv, device=audio_len.device, dtype=torch.float64)[None, :]
    la, lv = audio_len.double()[:, None], video_len.double().clamp_min(1)[:, None]
    idx = torch.floor((j + 0.5) * la / lv).long()
    return torch.minimum(idx, (audio_len[:, None] - 1).clamp_min(0))


def time_resample(values: Tensor, audio_mask: Tensor | None, video_mask: Tensor) -> Aligned:
    """Relative-time area resampling: video frame j averages the audio frames i with ⌊i·Lv/La⌋ = j; when
    no audio frame falls in it (video faster than audio) it takes the audio frame at its centre time."""
    audio_mask = _check_mask(audio_mask, values, "audio_mask")
    video_mask = _check_mask(video_mask, video_mask.unsqueeze(-1), "video_mask")
    ta, tv = values.shape[1], video_mask.shape[1]
    la, lv = audio_mask.sum(1), video_mask.sum(1)
    i = torch.arange(ta, device=values.device)[None, :]
    j_of_i = torch.div(i * lv[:, None], la.clamp_min(1)[:, None], rounding_mode="floor")  # [B, Ta]
    frames = torch.arange(tv, device=values.device)
    w = (j_of_i[:, None, :] == frames[None, :, None]) & audio_mask[:, None, :]  # [B, Tv, Ta]
    nearest = _relative_time_index(la, lv, tv)
    w_near = (torch.arange(ta, device=values.device)[None, None, :] == nearest[:, :, None]) & audio_mask[:, None, :]
    w = torch.where(w.any(-1, keepdim=True), w, w_near).to(values.dtype)
    w = w / w.sum(-1, keepdim=True).clamp_min(1.0)
    out_mask = video_mask & (la > 0)[:, None]
    return _zero_padding(torch.bmm(w, values), out_mask)


# ---------------------------------------------------------------- CTC best path and segments


def ctc_best_path(log_probs: Tensor, mask: Tensor | None = None) -> Tensor:
    """Frame-wise argmax labels [B, T] (IGNORE_ID at padding) from logits or log-probabilities [B, T, V]."""
    labels = log_probs.argmax(-1)
    if mask is not None:
        labels = labels.masked_fill(~mask, IGNORE_ID)
    return labels


def ctc_collapse(labels: Tensor, blank: int = 0) -> list[list[int]]:
    """Merge repeats, drop blanks and padding: frame labels [B, T] → label sequences."""
    out = []
    for row in labels.tolist():
        seq, prev = [], None
        for lab in row:
            if lab != prev and lab != blank and lab != IGNORE_ID:
                seq.append(lab)
            prev = lab
        out.append(seq)
    return out


def ctc_greedy(log_probs: Tensor, mask: Tensor | None = None, blank: int = 0) -> list[list[int]]:
    """Greedy (best-path) CTC decoding: argmax per frame, merge repeats, drop blanks."""
    return ctc_collapse(ctc_best_path(log_probs, mask), blank)


def pad_sequences(seqs: list[list[int]], pad: int = IGNORE_ID, device: torch.device | None = None) -> Tensor:
    """Label sequences → padded long tensor [B, max(1, L)]."""
    width = max([1, *map(len, seqs)])
    out = torch.full((len(seqs), width), pad, dtype=torch.long)
    for b, s in enumerate(seqs):
        if s:
            out[b, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out.to(device) if device is not None else out


def target_lengths(targets: Tensor, lengths: Tensor | None = None) -> Tensor:
    """Lengths [B] of targets [B, L] padded with IGNORE_ID (or `lengths` when given)."""
    if lengths is not None:
        return lengths.to(device=targets.device, dtype=torch.long)
    return (targets != IGNORE_ID).sum(1)


def decoder_io(
    targets: Tensor, sos: int, eos: int, lengths: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher-forcing tensors for an attention decoder from targets [B, L] (-1 padded), all [B, L+1]:
    inputs `<sos> y` (padded with eos), outputs `y <eos>` (padded with -1) and the mask of real steps.
    Samples of length 0 have no transcript: their outputs are all -1 and their mask all False."""
    lengths = target_lengths(targets, lengths)
    b, width = targets.shape
    pos = torch.arange(width + 1, device=targets.device)[None, :]
    body = torch.where(pos[:, :width] < lengths[:, None], targets, torch.full_like(targets, eos))
    inputs = torch.cat([torch.full((b, 1), sos, dtype=torch.long, device=targets.device), body], dim=1)
    padded = torch.cat([body, torch.full((b, 1), eos, dtype=torch.long, device=targets.device)], dim=1)
    mask = (pos <= lengths[:, None]) & (lengths[:, None] > 0)
    outputs = torch.where(mask, padded, torch.full_like(padded, IGNORE_ID))
    return inputs, outputs, mask


def ctc_segments(labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """Segment id per frame [B, T] (IGNORE_ID at padding): a new segment starts wherever the best-path label
    changes, so every emitted token's run and every blank gap is one segment."""
    if mask is None:
        mask = labels != IGNORE_ID
    change = torch.ones_like(labels, dtype=torch.long)
    change[:, 1:] = (labels[:, 1:] != labels[:, :-1]).long()
    seg = change.cumsum(1) - 1
    return seg.masked_fill(~mask, IGNORE_ID)


def ctc_posterior_align(
    teacher_posteriors: Tensor,
    teacher_mask: Tensor | None,
    video_mask: Tensor,
    values: Tensor | None = None,
) -> Aligned:
    """Segment audio frames by the teacher's CTC best path, average `values` over each segment, and give
    each video frame the segment at its centre's relative time. `teacher_posteriors` are logits or
    log-probabilities [B, Ta, V]; `values` default to the posteriors as probabilities."""
    teacher_mask = _check_mask(teacher_mask, teacher_posteriors, "audio_mask")
    video_mask = _check_mask(video_mask, video_mask.unsqueeze(-1), "video_mask")
    if values is None:
        values = torch.softmax(teacher_posteriors.float(), dim=-1)
    if values.shape[:2] != teacher_posteriors.shape[:2]:
        raise ValueError(
            f"values {list(values.shape)} and teacher posteriors {list(teacher_posteriors.shape)} differ in [B, T]"
        )
    seg = ctc_segments(ctc_best_path(teacher_posteriors, teacher_mask), teacher_mask)  # [B, Ta]
    n_seg = int(seg.max().item()) + 1 if seg.numel() else 0
    if n_seg <= 0:
        return _zero_padding(values.new_zeros(values.shape[0], video_mask.shape[1], values.shape[-1]),
                             torch.zeros_like(video_mask))
    one_hot = (seg[:, :, None] == torch.arange(n_seg, device=seg.device)[None, None, :]).to(values.dtype)
    seg_mean = torch.bmm(one_hot.transpose(1, 2), values) / one_hot.sum(1).clamp_min(1.0).unsqueeze(-1)
    la, lv = teacher_mask.sum(1), video_mask.sum(1)
    centre = _relative_time_index(la, lv, video_mask.shape[1])  # audio frame per video frame
    seg_of_j = seg.gather(1, centre).clamp_min(0)  # [B, Tv]
    out = seg_mean.gather(1, seg_of_j.unsqueeze(-1).expand(-1, -1, values.shape[-1]))
    return _zero_padding(out, video_mask & (la > 0)[:, None])


# ---------------------------------------------------------------- registry over Features


class SequenceAligner:
    """Maps teacher Features onto the student's time axis; `values` default to the teacher tokens."""

    def __call__(self, teacher: Features, student: Features, values: Tensor | None = None) -> Aligned:
        if values is None:
            values = teacher.tokens
        if values is None:
            raise ValueError(f"{type(self).__name__} needs teacher token features (or explicit values)")
        if student.mask is None:
            raise ValueError(f"{type(self).__name__} needs student token features with a mask")
        return self.align(teacher, student, values)

    def align(self, teacher: Features, student: Features, values: Tensor) -> Aligned:
        raise NotImplementedError


ALIGNERS: Registry[type[SequenceAligner]] = Registry("aligner")


@ALIGNERS.register("rate_stack")
class RateStackAligner(SequenceAligner):
    """Stack k audio frames per video frame (mean or concat) when the frame rates divide."""

    def __init__(
        self,
        ratio: int | None = None,
        mode: Literal["mean", "concat"] = "mean",
        audio_rate: float | None = None,
        video_rate: float | None = None,
        tolerance: float = 1.0,
    ):
        self.kw = dict(ratio=ratio, mode=mode, audio_rate=audio_rate, video_rate=video_rate, tolerance=tolerance)

    def align(self, teacher: Features, student: Features, values: Tensor) -> Aligned:
        return rate_stack(values, teacher.mask, student.mask, **self.kw)


@ALIGNERS.register("attention")
class AttentionAligner(SequenceAligner):
    """LIBS attention: student tokens query teacher tokens; the query is detached by default so the student
    is pulled toward the aligned target rather than toward an easier alignment."""

    def __init__(self, temperature: float = 1.0, detach_query: bool = True):
        self.temperature = temperature
        self.detach_query = detach_query

    def align(self, teacher: Features, student: Features, values: Tensor) -> Aligned:
        if teacher.tokens is None or student.tokens is None:
            raise ValueError("attention alignment needs token features from both teacher and student")
        q = student.tokens.detach() if self.detach_query else student.tokens
        return attention_align(q, teacher.tokens, values, teacher.mask, student.mask, temperature=self.temperature)


@ALIGNERS.register("ctc")
class CTCPosteriorAligner(SequenceAligner):
    """Segment by the teacher's CTC best path (teacher logits) and map segments by relative time."""

    def align(self, teacher: Features, student: Features, values: Tensor) -> Aligned:
        if teacher.logits is None or teacher.logits.dim() != 3:
            raise ValueError("the 'ctc' aligner needs teacher CTC logits [B, T, V] in Features.logits")
        return ctc_posterior_align(teacher.logits, teacher.mask, student.mask, values)


@ALIGNERS.register("time")
class TimeAligner(SequenceAligner):
    """Relative-time area resampling, for any pair of rates."""

    def align(self, teacher: Features, student: Features, values: Tensor) -> Aligned:
        return time_resample(values, teacher.mask, student.mask)


@ALIGNERS.register("identity")
class IdentityAligner(SequenceAligner):
    """Sequences already on one time axis (step j of the teacher is step j of the student, e.g. decoder states
    teacher-forced on the same transcript): teacher values pass through, masks are combined. The padded widths
    may differ (a cached teacher is padded to its own batch maximum) as long as no real teacher step is cut."""

    def align(self, teacher: Features, student: Features, values: Tensor) -> Aligned:
        b, tv = student.mask.shape
        tmask = teacher.mask if teacher.mask is not None else torch.ones(values.shape[:2], dtype=torch.bool,
                                                                          device=values.device)
        if values.shape[0] != b or (values.shape[1] > tv and bool(tmask[:, tv:].any())):
            raise ValueError(
                f"the 'identity' aligner needs equal lengths, got teacher {list(values.shape[:2])} and student "
                f"{list(student.mask.shape)}; use 'attention', 'ctc', 'time' or 'rate_stack'"
            )
        if values.shape[1] != tv:  # trim or pad the teacher's padding to the student's width
            pad = tv - values.shape[1]
            values = torch.nn.functional.pad(values[:, :tv], (0, 0, 0, max(pad, 0)))
            tmask = torch.nn.functional.pad(tmask[:, :tv], (0, max(pad, 0)), value=False)
        return _zero_padding(values, student.mask & tmask)


def build_aligner(name: str, **params) -> SequenceAligner:
    """Aligner by registry name, with its parameters checked."""
    return ALIGNERS.build(name, **params)
