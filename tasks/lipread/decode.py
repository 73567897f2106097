"""Decoding for CTC/attention recognisers: greedy CTC, CTC prefix beam search, joint CTC/attention beam search.

- greedy: best path (argmax per frame), repeats merged, blanks dropped.
- beam: CTC prefix beam search (Hannun et al., 2014): sums the probability of every path that collapses to a
  prefix, so it finds label sequences whose probability is spread over many paths (which greedy misses).
- joint: label-synchronous beam search scoring each hypothesis by
  `(1 − λ)·log p_att(y) + λ·log p_ctc(y…)` with the attention decoder and CTC prefix scores
  (Watanabe et al., 2017; ESPnet's CTCPrefixScore), λ = `ctc_weight`. Every non-blank token is scored at
  each step (character vocabularies are small, so no pre-beam is needed).

All functions decode one utterance from log-probabilities over its real frames; `decode_batch` handles
batches and masks. `DECODERS` maps the names "greedy", "beam" and "joint" to batch decoders.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from xmodal.errors import ConfigError
from xmodal.registry import Registry
from xmodal.seqalign import ctc_greedy

NEG_INF = float("-inf")


def _logaddexp(a: float, b: float) -> float:
    if a == NEG_INF:
        return b
    if b == NEG_INF:
        return a
    hi, lo = (a, b) if a > b else (b, a)
    return hi + math.log1p(math.exp(lo - hi))


# ---------------------------------------------------------------- CTC prefix beam search


def ctc_prefix_beam_search(
    log_probs: Tensor, beam_size: int = 10, blank: int = 0, token_prune: int | None = None
) -> list[tuple[tuple[int, ...], float]]:
    """Best label sequences for one utterance's CTC log-probabilities [T, V], with their log-probabilities.

    `token_prune` keeps only that many most likely tokens per frame (all by default).
    """
    if log_probs.dim() != 2:
        raise ValueError(f"ctc_prefix_beam_search decodes one utterance [T, V], got {list(log_probs.shape)}")
    if beam_size < 1:
        raise ConfigError(f"beam_size must be at least 1, got {beam_size}")
    lp = torch.log_softmax(log_probs.detach().float().cpu(), dim=-1)
    vocab = lp.shape[1]
    beams: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, NEG_INF)}  # prefix → (log p_blank, log p_nonblank)
    for t in range(lp.shape[0]):
        row = lp[t].tolist()
        if token_prune and token_prune < vocab:
            cands = [c for c in torch.topk(lp[t], token_prune).indices.tolist() if c != blank]
        else:
            cands = [c for c in range(vocab) if c != blank]
        nxt: dict[tuple[int, ...], list[float]] = {}
        for prefix, (pb, pnb) in beams.items():
            total = _logaddexp(pb, pnb)
            s = nxt.setdefault(prefix, [NEG_INF, NEG_INF])
            s[0] = _logaddexp(s[0], total + row[blank])
            last = prefix[-1] if prefix else None
            for c in cands:
                p = row[c]
                ext = nxt.setdefault(prefix + (c,), [NEG_INF, NEG_INF])
                if c == last:
                    s[1] = _logaddexp(s[1], pnb + p)  # repeat merges into the same prefix
                    ext[1] = _logaddexp(ext[1], pb + p)  # a blank in between starts a new label
                else:
                    ext[1] = _logaddexp(ext[1], total + p)
        ranked = sorted(nxt.items(), key=lambda kv: _logaddexp(*kv[1]), reverse=True)[:beam_size]
        beams = {k: (v[0], v[1]) for k, v in ranked}
    scored = [(k, _logaddexp(*v)) for k, v in beams.items()]
    return sorted([kv for kv in scored if kv[1] > NEG_INF], key=lambda kv: kv[1], reverse=True)


# ---------------------------------------------------------------- CTC prefix scores (for joint decoding)


class CTCPrefixScorer:
    """log p_ctc(prefix…) for hypotheses of one utterance, vectorised over hypotheses × candidate tokens.

    State per hypothesis: forward variables r_n[t], r_b[t] (log) of paths ending in a non-blank / blank at
    frame t with the hypothesis as their labelling.
    """

    def __init__(self, log_probs: Tensor, blank: int = 0, eos: int = 1):
        self.lp = torch.log_softmax(log_probs.detach().float(), dim=-1)  # [T, V]
        self.blank, self.eos = blank, eos
        self.T = self.lp.shape[0]

    def initial_state(self) -> tuple[Tensor, Tensor]:
        """(r_n, r_b) [1, T] for the empty prefix."""
        r_n = torch.full((1, self.T), NEG_INF)
        r_b = torch.cumsum(self.lp[:, self.blank], 0)[None]
        return r_n, r_b

    def final(self, r_n: Tensor, r_b: Tensor) -> Tensor:
        """log p_ctc(y) of each complete hypothesis [H]."""
        return torch.logaddexp(r_n[:, -1], r_b[:, -1])

    def extend(self, r_n: Tensor, r_b: Tensor, last: Tensor, lengths: Tensor, cands: Tensor) -> tuple[Tensor, ...]:
        """Prefix scores ψ [H, C] of h + c for candidates cands [H, C], with the new states [H, C, T].

        `last` [H] is each hypothesis's last token (-1 when empty); `lengths` [H] its length. For c = eos,
        ψ is the full-sequence probability of h.
        """
        h, c = cands.shape
        x = self.lp[:, cands.reshape(-1)].reshape(self.T, h, c)  # [T, H, C]
        r_sum = torch.logaddexp(r_n, r_b).T[:, :, None]  # [T, H, 1]
        phi = torch.where(cands[None] == last[None, :, None], r_b.T[:, :, None], r_sum)  # [T, H, C]
        new_n = torch.full((self.T, h, c), NEG_INF)
        new_b = torch.full((self.T, h, c), NEG_INF)
        new_n[0] = torch.where((lengths == 0)[:, None], x[0], torch.full_like(x[0], NEG_INF))
        blank_lp = self.lp[:, self.blank]
        for t in range(1, self.T):
            new_n[t] = torch.logaddexp(new_n[t - 1], phi[t - 1]) + x[t]
            new_b[t] = torch.logaddexp(new_n[t - 1], new_b[t - 1]) + blank_lp[t]
        psi = torch.logsumexp(torch.cat([new_n[:1], phi[:-1] + x[1:]], 0), dim=0)  # [H, C]
        is_eos = cands == self.eos
        psi = torch.where(is_eos, self.final(r_n, r_b)[:, None].expand(h, c), psi)
        return psi, new_n.permute(1, 2, 0), new_b.permute(1, 2, 0)


# ---------------------------------------------------------------- joint CTC/attention beam search


def joint_beam_search(
    next_log_probs: Callable[[Tensor], Tensor],
    ctc_log_probs: Tensor,
    *,
    beam_size: int = 10,
    ctc_weight: float = 0.3,
    sos: int = 1,
    eos: int = 1,
    blank: int = 0,
    max_len: int | None = None,
    length_bonus: float = 0.0,
) -> list[tuple[tuple[int, ...], float]]:
    """Joint CTC/attention beam search for one utterance.

    `next_log_probs(prefixes [H, K]) -> [H, V]` gives the attention decoder's log-probabilities of the next
    token after `<sos> y…`; `ctc_log_probs` [T, V] are the CTC log-probabilities over the real frames.
    Returns finished hypotheses (without sos/eos) best first with their scores.
    """
    if not 0.0 <= ctc_weight <= 1.0:
        raise ConfigError(f"ctc_weight must be in [0, 1], got {ctc_weight}")
    if beam_size < 1:
        raise ConfigError(f"beam_size must be at least 1, got {beam_size}")
    scorer = CTCPrefixScorer(ctc_log_probs.cpu(), blank, eos)
    vocab = scorer.lp.shape[1]
    max_len = scorer.T if max_len is None else max_len
    cand_ids = torch.tensor([v for v in range(vocab) if v != blank and (v != sos or sos == eos)])
    tokens: list[tuple[int, ...]] = [()]
    att = torch.zeros(1)
    r_n, r_b = scorer.initial_state()
    ended: list[tuple[tuple[int, ...], float]] = []
    for step in range(max_len + 1):
        h = len(tokens)
        prefixes = torch.tensor([[sos, *t] for t in tokens], dtype=torch.long)
        att_lp = next_log_probs(prefixes).detach().float().cpu()[:, cand_ids]  # [H, C]
        cands = cand_ids[None].expand(h, -1)
        last = torch.tensor([t[-1] if t else -1 for t in tokens])
        lengths = torch.tensor([len(t) for t in tokens])
        if ctc_weight > 0:
            psi, new_n, new_b = scorer.extend(r_n, r_b, last, lengths, cands)
        else:
            psi = torch.zeros_like(att_lp)
            new_n = new_b = torch.zeros(h, cands.shape[1], scorer.T)
        att_new = att[:, None] + att_lp
        score = (1 - ctc_weight) * att_new + ctc_weight * psi + length_bonus * (lengths[:, None] + 1)
        if step == max_len:  # only eos may follow
            score = torch.where(cands == eos, score, torch.full_like(score, NEG_INF))
        flat = score.reshape(-1)
        k = min(beam_size, int(torch.isfinite(flat).sum()))
        if k == 0:
            break
        top = torch.topk(flat, k)
        keep_h, keep_c, new_tokens = [], [], []
        for s, idx in zip(top.values.tolist(), top.indices.tolist()):
            hi, ci = divmod(idx, cands.shape[1])
            tok = int(cands[hi, ci])
            if tok == eos:
                ended.append((tokens[hi], s))
            else:
                keep_h.append(hi)
                keep_c.append(ci)
                new_tokens.append((*tokens[hi], tok))
        if not new_tokens:
            break
        hi_t, ci_t = torch.tensor(keep_h), torch.tensor(keep_c)
        tokens = new_tokens
        att = att_new[hi_t, ci_t]
        r_n, r_b = new_n[hi_t, ci_t], new_b[hi_t, ci_t]
        best_running = float(score[hi_t, ci_t].max())
        if length_bonus <= 0 and ended and max(s for _, s in ended) >= best_running:
            break  # extensions only lower log-probabilities: nothing running can overtake the best ended
    return sorted(ended, key=lambda kv: kv[1], reverse=True)


# ---------------------------------------------------------------- batch decoders

DECODERS: Registry = Registry("decoder")


def _check_out(out: Any) -> tuple[Tensor, Tensor, Tensor]:
    states, mask, logits = tuple(out)[:3]
    if logits is None:
        raise ConfigError("decoding needs CTC logits from the model (its CTC head)")
    return states, mask, logits


@DECODERS.register("greedy")
def greedy_decode(out: Any, model: Any = None, *, blank: int = 0) -> list[list[int]]:
    """Best-path CTC decoding of a batch (EncoderOutput: states, mask, ctc_logits)."""
    _, mask, logits = _check_out(out)
    return ctc_greedy(logits, mask, blank)


@DECODERS.register("beam")
def beam_decode(out: Any, model: Any = None, *, beam_size: int = 10, blank: int = 0,
                token_prune: int | None = None) -> list[list[int]]:
    """CTC prefix beam search per utterance of a batch."""
    _, mask, logits = _check_out(out)
    hyps = []
    for b in range(logits.shape[0]):
        n = int(mask[b].sum())
        best = ctc_prefix_beam_search(logits[b, :n], beam_size, blank, token_prune)
        hyps.append(list(best[0][0]) if best else [])
    return hyps


@DECODERS.register("joint")
def joint_decode(out: Any, model: Any, *, beam_size: int = 10, ctc_weight: float = 0.3,
                 max_len: int | None = None, length_bonus: float = 0.0) -> list[list[int]]:
    """Joint CTC/attention beam search per utterance; `model` provides `decoder.next_log_probs`."""
    states, mask, logits = _check_out(out)
    decoder = getattr(model, "decoder", None)
    if decoder is None or not hasattr(decoder, "next_log_probs"):
        raise ConfigError("joint decoding needs a model with an attention decoder (model.decoder.next_log_probs)")
    hyps = []
    for b in range(logits.shape[0]):
        n = int(mask[b].sum())
        memory, mem_mask = states[b : b + 1, :n], mask[b : b + 1, :n]

        def next_lp(prefixes: Tensor, memory=memory, mem_mask=mem_mask) -> Tensor:
            k = prefixes.shape[0]
            return decoder.next_log_probs(prefixes.to(memory.device), memory.expand(k, -1, -1),
                                          mem_mask.expand(k, -1))

        best = joint_beam_search(next_lp, logits[b, :n], beam_size=beam_size, ctc_weight=ctc_weight,
                                 sos=model.sos, eos=model.eos, blank=model.blank, max_len=max_len,
                                 length_bonus=length_bonus)
        hyps.append(list(best[0][0]) if best else [])
    return hyps


@torch.no_grad()
def decode_batch(model: Any, x: Tensor, mask: Tensor | None = None, decoder: str = "greedy",
                 **options: Any) -> list[list[int]]:
    """Run `model(x, mask)` (an EncoderOutput-returning recogniser) and decode with the named decoder."""
    DECODERS.get(decoder)  # unknown names fail before the model runs
    if decoder in ("greedy", "beam") and "blank" not in options and hasattr(model, "blank"):
        options["blank"] = model.blank
    return DECODERS.build(decoder, out=model(x, mask), model=model, **options)
