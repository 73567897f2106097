"""Character vocabulary shared by CTC and attention decoders (ESPnet layout: blank, shared sos/eos, characters)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence

from xmodal.errors import ConfigError, DataError

DEFAULT_CHARS = " '" + "abcdefghijklmnopqrstuvwxyz"
BLANK = "<blank>"
SOS_EOS = "<sos/eos>"
IGNORE_ID = -1  # padding value for targets in batches

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})
_SPACES = re.compile(r"\s+")


class CharVocab:
    """Index 0 = CTC blank, 1 = start/end token of the attention decoder, then one index per character."""

    def __init__(self, chars: str | Sequence[str] = DEFAULT_CHARS) -> None:
        chars = list(chars)
        bad = [c for c in chars if len(c) != 1]
        if bad:
            raise ConfigError(f"vocabulary entries must be single characters, got {bad[:5]}")
        dupes = sorted({c for c in chars if chars.count(c) > 1})
        if dupes:
            raise ConfigError(f"vocabulary has duplicate characters {dupes}")
        if not chars:
            raise ConfigError("vocabulary needs at least one character")
        self.chars: tuple[str, ...] = tuple(chars)
        self.tokens: tuple[str, ...] = (BLANK, SOS_EOS, *self.chars)
        self._index = {c: i + 2 for i, c in enumerate(self.chars)}

    blank = 0
    sos = 1
    eos = 1

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"CharVocab({''.join(self.chars)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharVocab) and other.chars == self.chars

    def __hash__(self) -> int:
        return hash(self.chars)

    @staticmethod
    def normalize(text: str) -> str:
        """Lowercase, map typographic apostrophes to "'", replace other punctuation by spaces, collapse spaces.

        Unicode punctuation (categories P*) other than the apostrophe becomes a space, so "well-known" →
        "well known" and "Hello, world!" → "hello world"; digits and symbols are kept (and rejected by
        `encode` if the vocabulary lacks them).
        """
        text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).lower()
        text = "".join(" " if unicodedata.category(c).startswith("P") and c != "'" else c for c in text)
        return _SPACES.sub(" ", text).strip()

    def encode(self, text: str, sample_id: str | None = None) -> list[int]:
        """Map characters to indices; text is used as given (call `normalize` first for raw transcripts)."""
        ids = [self._index.get(c, -1) for c in text]
        if -1 in ids:
            bad = sorted({c for c, i in zip(text, ids) if i == -1})
            where = f"sample {sample_id!r}: " if sample_id is not None else ""
            raise DataError(f"{where}transcript {text!r} has characters outside the vocabulary: {bad}; "
                            f"the vocabulary is {''.join(self.chars)!r} (normalise the text or extend the "
                            "vocabulary)")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Indices back to text; blank, sos/eos and padding (negative ids) are skipped."""
        out = []
        for i in ids:
            i = int(i)
            if i < 2:
                continue
            if i >= len(self.tokens):
                raise DataError(f"token id {i} is outside the vocabulary of size {len(self.tokens)}")
            out.append(self.tokens[i])
        return "".join(out)

    def to_dict(self) -> dict:
        return {"chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, data: dict) -> CharVocab:
        if "chars" not in data:
            raise ConfigError(f"vocabulary record lacks the key 'chars' (got keys {sorted(data)})")
        return cls(data["chars"])
