"""Character and word error rates with one documented text normalisation.

Normalisation (`normalize_text`, the same as `CharVocab.normalize`): Unicode NFKC, typographic apostrophes
→ "'", lowercase, every punctuation character other than the apostrophe → space, runs of whitespace → one
space, trimmed. Both reference and hypothesis are normalised before scoring.

CER = Σ character edits / Σ reference characters, spaces included (word-boundary errors count);
WER = Σ word edits / Σ reference words, words split on spaces. Both are corpus-level (summed over utterances,
then divided), as in ESPnet and sclite. Edit distances come from `torchaudio.functional.edit_distance`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from xmodal.data.vocab import CharVocab


def normalize_text(text: str) -> str:
    """The text normalisation applied before scoring (see the module docstring)."""
    return CharVocab.normalize(text)


def edit_distance(ref: list, hyp: list) -> int:
    import torchaudio.functional as AF

    return int(AF.edit_distance(ref, hyp))


def char_errors(ref: str, hyp: str, normalize: bool = True) -> tuple[int, int]:
    """(character edits, reference characters) for one utterance."""
    if normalize:
        ref, hyp = normalize_text(ref), normalize_text(hyp)
    return edit_distance(list(ref), list(hyp)), len(ref)


def word_errors(ref: str, hyp: str, normalize: bool = True) -> tuple[int, int]:
    """(word edits, reference words) for one utterance."""
    if normalize:
        ref, hyp = normalize_text(ref), normalize_text(hyp)
    r, h = ref.split(), hyp.split()
    return edit_distance(r, h), len(r)


@dataclass
class ErrorRates:
    """Running totals of character and word edits; `summary()` gives CER, WER and the counts."""

    char_edits: int = 0
    chars: int = 0
    word_edits: int = 0
    words: int = 0
    utterances: int = 0

    def update(self, refs: Iterable[str], hyps: Iterable[str]) -> None:
        for ref, hyp in zip(refs, hyps, strict=True):
            ce, cn = char_errors(ref, hyp)
            we, wn = word_errors(ref, hyp)
            self.char_edits += ce
            self.chars += cn
            self.word_edits += we
            self.words += wn
            self.utterances += 1

    @property
    def cer(self) -> float:
        return self.char_edits / self.chars if self.chars else float("nan")

    @property
    def wer(self) -> float:
        return self.word_edits / self.words if self.words else float("nan")

    def summary(self) -> dict[str, float | int]:
        return {"cer": self.cer, "wer": self.wer, "num_utterances": self.utterances, "char_edits": self.char_edits,
                "chars": self.chars, "word_edits": self.word_edits, "words": self.words}


def cer(refs: Iterable[str] | str, hyps: Iterable[str] | str) -> float:
    """Corpus-level character error rate (single strings are one utterance)."""
    rates = ErrorRates()
    rates.update([refs] if isinstance(refs, str) else refs, [hyps] if isinstance(hyps, str) else hyps)
    return rates.cer


def wer(refs: Iterable[str] | str, hyps: Iterable[str] | str) -> float:
    """Corpus-level word error rate (single strings are one utterance)."""
    rates = ErrorRates()
    rates.update([refs] if isinstance(refs, str) else refs, [hyps] if isinstance(hyps, str) else hyps)
    return rates.wer
