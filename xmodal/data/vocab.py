"""Vocabularies shared by CTC and attention decoders (ESPnet layout: blank, shared sos/eos, then the units):
characters (`CharVocab`) or sentencepiece subwords (`SentencePieceVocab`), kinds in the `VOCABULARIES` registry."""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

from xmodal.errors import ConfigError, DataError
from xmodal.registry import Registry

DEFAULT_CHARS = " '" + "abcdefghijklmnopqrstuvwxyz"
BLANK = "<blank>"
SOS_EOS = "<sos/eos>"
IGNORE_ID = -1  # padding value for targets in batches

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})
_SPACES = re.compile(r"\s+")


class CharVocab:
    """Index 0 = CTC blank, 1 = start/end token of the attention decoder, then one index per character."""

    kind = "chars"

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


# ---------------------------------------------------------------------------------------------- subword units

SPEECH_EXTRA = "pip install 'xmodal[speech]'"


def _sentencepiece():
    try:
        import sentencepiece
    except ImportError as e:
        raise ConfigError(f"subword vocabularies need the sentencepiece package: {SPEECH_EXTRA}") from e
    return sentencepiece


class SentencePieceVocab:
    """Subword units from a sentencepiece model, in the same layout as CharVocab: index 0 = CTC blank, 1 = start/end
    token of the attention decoder, then the model's pieces (piece id + 2; its own <unk> included, never emitted).

    Text is normalised with `CharVocab.normalize` before training and encoding, so CER/WER compare the same text
    as with characters. Text with a character the model never saw is a DataError naming it, not silently <unk>.
    """

    kind = "sentencepiece"
    blank = 0
    sos = 1
    eos = 1
    normalize = staticmethod(CharVocab.normalize)

    def __init__(self, model: bytes, source: str = "<memory>") -> None:
        spm = _sentencepiece()
        self.model = bytes(model)
        self.source = source
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self.model)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError for a bad proto
            raise ConfigError(f"{source} is not a sentencepiece model: {e}") from e
        pieces = [self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size())]
        self.pieces: tuple[str, ...] = tuple(pieces)
        self.tokens: tuple[str, ...] = (BLANK, SOS_EOS, *pieces)
        self._unk = self._sp.unk_id()
        self._chars = {c for i, p in enumerate(pieces) if i != self._unk and not self._sp.is_control(i) for c in p}
        self._chars.discard("\u2581")

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"SentencePieceVocab({len(self.pieces)} pieces from {self.source})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SentencePieceVocab) and other.model == self.model

    def __hash__(self) -> int:
        return hash(self.model)

    def encode(self, text: str, sample_id: str | None = None) -> list[int]:
        """Pieces of `text` as indices (call `normalize` first for raw transcripts)."""
        bad = sorted({c for c in text if c != " " and c not in self._chars})
        if bad:
            where = f"sample {sample_id!r}: " if sample_id is not None else ""
            raise DataError(f"{where}transcript {text!r} has characters outside the vocabulary: {bad}; the subword "
                            f"model {self.source} never saw them (retrain it on transcripts that include them, or "
                            "normalise the text)")
        return [i + 2 for i in self._sp.encode(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Indices back to text; blank, sos/eos, padding (negative ids) and <unk> are skipped."""
        pieces = []
        for i in ids:
            i = int(i)
            if i < 2:
                continue
            if i >= len(self.tokens):
                raise DataError(f"token id {i} is outside the vocabulary of size {len(self.tokens)}")
            if i - 2 != self._unk:
                pieces.append(i - 2)
        return self._sp.decode(pieces)

    def to_dict(self) -> dict:
        import base64

        return {"kind": self.kind, "model": base64.b64encode(self.model).decode("ascii")}

    @classmethod
    def from_dict(cls, data: dict) -> SentencePieceVocab:
        import base64
        import binascii

        if not isinstance(data.get("model"), str):
            raise ConfigError(f"sentencepiece vocabulary record lacks the key 'model' (got keys {sorted(data)})")
        try:
            return cls(base64.b64decode(data["model"], validate=True), source="<checkpoint>")
        except binascii.Error as e:
            raise ConfigError(f"sentencepiece vocabulary record: 'model' is not base64 ({e})") from e

    @classmethod
    def load(cls, path: str | os.PathLike) -> SentencePieceVocab:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read sentencepiece model {path}: {e}") from e
        return cls(data, source=str(path))

    def save(self, path: str | os.PathLike) -> None:
        from xmodal.io import atomic_write

        with atomic_write(path, "wb") as f:
            f.write(self.model)


def train_sentencepiece(texts: Iterable[str], vocab_size: int, *, model_type: str = "unigram",
                        source: str = "<texts>") -> SentencePieceVocab:
    """Train a sentencepiece model (unigram by default) on normalised `texts`; every character is kept
    (character_coverage 1.0), training is single-threaded and in order, so the same texts give the same model."""
    import io

    spm = _sentencepiece()
    lines = [t for t in (CharVocab.normalize(x) for x in texts) if t]
    if not lines:
        raise DataError(f"{source}: no transcripts to train a subword vocabulary on")
    if vocab_size < 2:
        raise ConfigError(f"vocab_size must be at least 2, got {vocab_size}")
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size, model_type=model_type,
            character_coverage=1.0, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, normalization_rule_name="identity",
            num_threads=1, shuffle_input_sentence=False, input_sentence_size=0, minloglevel=2,
        )
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1].split("] ", 1)[-1]  # drop the C++ source location
        hint = " (lower vocab_size)" if "Vocabulary size" in msg else ""
        raise ConfigError(f"{source}: sentencepiece training failed: {msg}{hint}") from e
    return SentencePieceVocab(out.getvalue(), source=source)


# ---------------------------------------------------------------------------------------------- vocabulary kinds

VOCABULARIES: Registry[type] = Registry("vocabulary kind")  # kind → class with from_dict (a record's "kind")
VOCABULARIES.register("chars", CharVocab)
VOCABULARIES.register("sentencepiece", SentencePieceVocab)

Vocab = CharVocab | SentencePieceVocab


def vocab_from_dict(data: dict) -> Vocab:
    """A vocabulary from its `to_dict` record (records without "kind" are character vocabularies)."""
    if not isinstance(data, dict):
        raise ConfigError(f"a vocabulary record must be a mapping, got {type(data).__name__}")
    return VOCABULARIES.get(data.get("kind", "chars")).from_dict(data)


def load_vocab(spec: str | os.PathLike | dict) -> Vocab:
    """A vocabulary from config: a record (`to_dict`), a sentencepiece `.model` file, or the characters themselves."""
    if isinstance(spec, dict):
        return vocab_from_dict(spec)
    if isinstance(spec, os.PathLike) or str(spec).endswith(".model"):
        return SentencePieceVocab.load(spec)
    return CharVocab(spec)


def relabel(ids: Iterable[int], source: Vocab, target: Vocab, sample_id: str | None = None) -> list[int]:
    """Teacher-to-student label mapping through text: `source` ids → text → `target` ids (e.g. a character teacher's
    transcript as subword targets for the student)."""
    return target.encode(target.normalize(source.decode(ids)), sample_id=sample_id)
