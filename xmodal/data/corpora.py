"""Real lip-reading corpora → the JSON-lines manifests `read_av_manifest` reads.

Two layouts, each a reader in `CORPUS_LAYOUTS` yielding `CorpusItem`s:

- "lrs": the LRS2/LRS3 folder layout, `<root>/<split>/<speaker or video id>/<utt>.mp4` with an optional
  `<utt>.txt` whose first line is `Text:  THE WORDS` (LRS2/LRS3's header format). Clips without a .txt are
  unlabelled (allowed; counted).
- "auto_avsr": auto_avsr's label list, a CSV of `dataset,rel_path,frames,token ids` lines with paths under
  `<root>/<dataset>/`; the text comes from the `<dataset>_text_seg…` mirror file auto_avsr writes beside the
  video folder, or from the token ids with its `unigram…_units.txt` file.

Audio is a `.wav` beside the video when there is one, else the video file itself when it carries an audio track.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from xmodal.data.vocab import CharVocab
from xmodal.errors import ConfigError, DataError
from xmodal.io import atomic_write
from xmodal.registry import Registry, check_kwargs

VIDEO_SUFFIXES = (".mp4",)
AUDIO_MODES = ("auto", "none")


@dataclass
class CorpusItem:
    """One utterance found in a corpus; paths absolute, transcript None when the clip is unlabelled."""

    id: str
    video: Path
    transcript: str | None = None
    speaker: str | None = None
    audio: Path | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class ManifestSummary:
    """What a manifest build found: counts for the report and for deciding what to do next."""

    path: Path
    utterances: int = 0
    labelled: int = 0
    audio_wav: int = 0
    audio_in_video: int = 0
    outside_chars: dict[str, int] = field(default_factory=dict)  # id → characters outside the default vocabulary

    @property
    def unlabelled(self) -> int:
        return self.utterances - self.labelled

    @property
    def no_audio(self) -> int:
        return self.utterances - self.audio_wav - self.audio_in_video


CORPUS_LAYOUTS: Registry[Callable[..., Iterator[CorpusItem]]] = Registry("corpus layout")


# ------------------------------------------------------------------------------------------------ LRS2 / LRS3


def parse_lrs_text(path: str | Path) -> str:
    """The transcript of an LRS2/LRS3 .txt file: its `Text:` line, with `{…}` markers' braces dropped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read transcript {path}: {e}") from e
    for line in lines:
        if line.startswith("Text:"):
            return " ".join(line[len("Text:"):].replace("{", "").replace("}", "").split())
        if line.strip():
            break
    first = next((ln for ln in lines if ln.strip()), "")
    raise DataError(f"{path}: expected the LRS header line 'Text:  THE WORDS' first, found {first[:60]!r}; "
                    "give the transcript in LRS2/LRS3 format or remove the file to leave the clip unlabelled")


def _lrs_splits(root: Path, splits: Iterable[str] | None) -> list[str]:
    if splits:
        names = list(splits)
        missing = [s for s in names if not (root / s).is_dir()]
        if missing:
            present = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise DataError(f"{root}: no split folder {missing} (folders present: {present or 'none'})")
        return names
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*/*.mp4")))
    if not names:
        raise DataError(f"{root}: no <split>/<speaker or video id>/<utt>.mp4 files (the LRS2/LRS3 layout); point at "
                        "the folder that holds the split folders (e.g. pretrain, trainval, test)")
    return names


def _read_keep_list(path: Path) -> set[str]:
    """LRS2-style split list: one `<video id>/<utt>` per line (anything after a space ignored)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"cannot read split list {path}: {e}") from e
    return {ln.split()[0].removesuffix(".mp4") for ln in lines if ln.strip()}


@CORPUS_LAYOUTS.register("lrs")
def scan_lrs(root: str | Path, *, splits: Iterable[str] | None = None, keep: str | Path | None = None,
             audio: str = "auto") -> Iterator[CorpusItem]:
    """Utterances of an LRS2/LRS3 tree in sorted order; ids `<split>/<video id>/<utt>`, speaker the video id.

    `keep`: an LRS2 split list (`<video id>/<utt>` lines) restricting which clips are taken; every entry must exist.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"corpus folder {root} does not exist")
    wanted = _read_keep_list(Path(keep)) if keep is not None else None
    found: set[str] = set()
    for split in _lrs_splits(root, splits):
        for video in sorted((root / split).glob("*/*")):
            if video.suffix.lower() not in VIDEO_SUFFIXES or not video.is_file():
                continue
            key = f"{video.parent.name}/{video.stem}"
            if wanted is not None and key not in wanted:
                continue
            found.add(key)
            text_file = video.with_suffix(".txt")
            transcript = parse_lrs_text(text_file) if text_file.is_file() else None
            yield CorpusItem(id=f"{split}/{key}", video=video, transcript=transcript, speaker=video.parent.name,
                             audio=find_audio(video, audio))
    if wanted is not None and wanted - found:
        missing = sorted(wanted - found)
        raise DataError(f"{keep}: {len(missing)} listed clips are not under {root} (first: {missing[:3]})")


# ------------------------------------------------------------------------------------------------ auto_avsr


def read_units(path: str | Path) -> dict[int, str]:
    """auto_avsr's `unigram…_units.txt`: `piece id` per line → {id: piece}."""
    path = Path(path)
    units: dict[int, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"cannot read units file {path}: {e}") from e
    for n, line in enumerate(lines, start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].isdigit():
            raise DataError(f"{path}:{n}: expected 'piece id', got {line[:60]!r}")
        units[int(parts[1])] = parts[0]
    return units


def _text_mirror(video: Path, dataset_dir: Path) -> Path | None:
    """auto_avsr writes text to `<dataset>_text_segNs/...txt` beside `<dataset>_video_segNs/...mp4`."""
    rel = video.relative_to(dataset_dir)
    head = rel.parts[0] if len(rel.parts) > 1 else ""
    if "_video_seg" not in head:
        return None
    return dataset_dir / head.replace("_video_seg", "_text_seg", 1) / Path(*rel.parts[1:]).with_suffix(".txt")


@CORPUS_LAYOUTS.register("auto_avsr")
def read_auto_avsr_labels(labels: str | Path, *, root: str | Path | None = None, units: str | Path | None = None,
                          audio: str = "auto") -> Iterator[CorpusItem]:
    """Utterances of an auto_avsr label list (`dataset,rel_path,frames,token ids`), in file order; ids are
    `<dataset>/<rel_path without .mp4>`, `frames` kept as an extra field.

    `root` holds the `<dataset>/` folders (default: the folder above the CSV's `labels/` folder). The transcript is
    the text mirror file when present, else the token ids decoded with `units`; with neither, the clip is
    unlabelled.
    """
    labels = Path(labels)
    if not labels.is_file():
        raise DataError(f"label list {labels} does not exist")
    root = Path(root) if root is not None else labels.resolve().parent.parent
    table = read_units(units) if units is not None else None
    seen: dict[str, int] = {}
    with labels.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{labels}:{n}"
            parts = line.rstrip("\n").split(",")
            if len(parts) != 4:
                raise DataError(f"{where}: expected 4 comma-separated fields (dataset,rel_path,frames,token ids), "
                                f"got {len(parts)}")
            dataset, rel, frames, ids = parts
            if not frames.strip().isdigit():
                raise DataError(f"{where}: frames must be a whole number, got {frames!r}")
            sid = f"{dataset}/{str(Path(rel).with_suffix(''))}"
            if sid in seen:
                raise DataError(f"{where}: duplicate clip {rel!r} (first on line {seen[sid]})")
            seen[sid] = n
            video = root / dataset / rel
            if not video.is_file():
                raise DataError(f"{where}: video {video} does not exist (is --root {root} the folder holding "
                                f"'{dataset}/'?)")
            mirror = _text_mirror(video, root / dataset)
            transcript = None
            if mirror is not None and mirror.is_file():
                transcript = " ".join(mirror.read_text(encoding="utf-8").split())
            elif table is not None:
                transcript = _decode_units(ids, table, where)
            parts_rel = Path(rel).parts
            speaker = parts_rel[-2] if len(parts_rel) >= 2 else None
            yield CorpusItem(id=sid, video=video, transcript=transcript, speaker=speaker,
                             audio=find_audio(video, audio), extra={"frames": int(frames)})


def _decode_units(ids: str, table: dict[int, str], where: str) -> str:
    pieces = []
    for tok in ids.split():
        if not tok.isdigit() or int(tok) not in table:
            raise DataError(f"{where}: token id {tok!r} is not in the units file")
        pieces.append(table[int(tok)])
    return " ".join("".join(pieces).replace("\u2581", " ").replace("<space>", " ").split())


# ------------------------------------------------------------------------------------------------ shared


def has_audio_stream(path: Path) -> bool:
    import av

    try:
        with av.open(str(path)) as c:
            return bool(c.streams.audio)
    except Exception:  # unreadable containers have no usable audio; the video loader reports them when read
        return False


def find_audio(video: Path, mode: str = "auto") -> Path | None:
    """The utterance's audio: a .wav beside the video, else the video itself if it has an audio track."""
    if mode not in AUDIO_MODES:
        raise ConfigError(f"audio must be one of {AUDIO_MODES}, got {mode!r}")
    if mode == "none":
        return None
    wav = video.with_suffix(".wav")
    if wav.is_file():
        return wav
    return video if has_audio_stream(video) else None


def _relative(path: Path, base: Path) -> str:
    return os.path.relpath(path.resolve(), base.resolve())


def write_manifest(items: Iterable[CorpusItem], out: str | Path) -> ManifestSummary:
    """Write the JSON-lines manifest atomically (paths relative to its folder) and count what went in."""
    out = Path(out)
    base = out.parent
    base.mkdir(parents=True, exist_ok=True)
    summary = ManifestSummary(out)
    allowed = set(CharVocab().chars)
    with atomic_write(out, "w") as f:
        for item in items:
            row: dict = {"id": item.id, "video": _relative(item.video, base)}
            if item.audio is not None:
                row["audio"] = _relative(item.audio, base)
                if item.audio == item.video:
                    summary.audio_in_video += 1
                else:
                    summary.audio_wav += 1
            if item.transcript:
                row["transcript"] = item.transcript
                summary.labelled += 1
                bad = sorted(set(CharVocab.normalize(item.transcript)) - allowed)
                if bad:
                    summary.outside_chars[item.id] = "".join(bad)
            if item.speaker is not None:
                row["speaker"] = item.speaker
            row.update(item.extra)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            summary.utterances += 1
        if not summary.utterances:  # raised inside the atomic write: an existing manifest stays as it was
            raise DataError(f"no utterances found; nothing written to {out}")
    return summary


def build_manifest(layout: str, source: str | Path, out: str | Path, **options) -> ManifestSummary:
    """Read `source` with the named layout and write the manifest `out`."""
    reader = CORPUS_LAYOUTS.get(layout)
    check_kwargs(reader, options, f"corpus layout {layout!r}")
    return write_manifest(reader(source, **options), out)
