"""LRS2/LRS3 folders and auto_avsr label lists → the lip job's JSON-lines manifest."""

import json

import pytest
from _media import moving_frames, tone, write_mp4, write_wav

from xmodal.cli import main
from xmodal.data.av import read_av_manifest
from xmodal.data.corpora import build_manifest, parse_lrs_text, read_auto_avsr_labels, scan_lrs
from xmodal.errors import DataError

LRS_TEXT = "Text:  {LG} WHEN YOU LOOK AT IT\nConf:  4\n\nWORD START END ASDSCORE\nWHEN 0.10 0.30 5.1\n"


@pytest.fixture(scope="module")
def lrs3(tmp_path_factory):
    """trainval/spkA: 00001 (text, audio in the mp4), 00002 (no text: unlabelled, .wav beside it);
    test/spkB: 00001 (text, no audio at all); plus files that are not clips."""
    root = tmp_path_factory.mktemp("lrs3")
    (root / "trainval" / "spkA").mkdir(parents=True)
    (root / "test" / "spkB").mkdir(parents=True)
    write_mp4(root / "trainval" / "spkA" / "00001.mp4", moving_frames(), audio=tone())
    (root / "trainval" / "spkA" / "00001.txt").write_text(LRS_TEXT)
    write_mp4(root / "trainval" / "spkA" / "00002.mp4", moving_frames(seed=1))
    write_wav(root / "trainval" / "spkA" / "00002.wav", tone())
    write_mp4(root / "test" / "spkB" / "00001.mp4", moving_frames(seed=2))
    (root / "test" / "spkB" / "00001.txt").write_text("Text:  HELLO THERE\nConf:  3\n")
    (root / "trainval" / "spkA" / "notes.md").write_text("not a clip")
    (root / "README").write_text("not a split")
    return root


EXPECTED = [
    {"id": "test/spkB/00001", "video": "lrs3/test/spkB/00001.mp4", "transcript": "HELLO THERE", "speaker": "spkB"},
    {"id": "trainval/spkA/00001", "video": "lrs3/trainval/spkA/00001.mp4", "audio": "lrs3/trainval/spkA/00001.mp4",
     "transcript": "LG WHEN YOU LOOK AT IT", "speaker": "spkA"},
    {"id": "trainval/spkA/00002", "video": "lrs3/trainval/spkA/00002.mp4", "audio": "lrs3/trainval/spkA/00002.wav",
     "speaker": "spkA"},
]


def relocate(rows, name):
    """EXPECTED paths are written for a manifest beside the corpus folder named `name`."""
    return [{k: (v.replace("lrs3/", f"{name}/", 1) if k in ("video", "audio") else v) for k, v in r.items()}
            for r in rows]


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lrs3_fixture_becomes_the_expected_manifest(lrs3):
    out = lrs3.parent / "lrs3.jsonl"
    assert main(["data", "manifest", str(lrs3), "--out", str(out)]) == 0
    assert read_rows(out) == relocate(EXPECTED, lrs3.name)
    records = read_av_manifest(out)  # what the lip job reads
    assert [r.video for r in records] == [lrs3 / r["video"].split("/", 1)[1] for r in EXPECTED]
    assert records[1].audio == records[1].video and records[0].audio is None and records[2].transcript is None


def test_split_selection_and_keep_list(lrs3, tmp_path):
    summary = build_manifest("lrs", lrs3, tmp_path / "m.jsonl", splits=["trainval"])
    assert [r["id"] for r in read_rows(tmp_path / "m.jsonl")] == ["trainval/spkA/00001", "trainval/spkA/00002"]
    assert (summary.utterances, summary.labelled, summary.unlabelled) == (2, 1, 1)
    assert (summary.audio_in_video, summary.audio_wav, summary.no_audio) == (1, 1, 0)
    keep = tmp_path / "train.txt"
    keep.write_text("spkA/00002 NF\n")
    build_manifest("lrs", lrs3, tmp_path / "k.jsonl", keep=keep, audio="none")
    assert read_rows(tmp_path / "k.jsonl") == [{"id": "trainval/spkA/00002", "video": rel(lrs3, tmp_path)
                                                + "/trainval/spkA/00002.mp4", "speaker": "spkA"}]
    keep.write_text("spkA/00002\nspkZ/00009\n")
    with pytest.raises(DataError, match=r"train\.txt: 1 listed clips are not under .*spkZ/00009"):
        build_manifest("lrs", lrs3, tmp_path / "k.jsonl", keep=keep)


def rel(target, base):
    import os

    return os.path.relpath(target, base)


def test_lrs_text_header_is_required(tmp_path):
    good = tmp_path / "a.txt"
    good.write_text("Text:  IT'S {NS} FINE  \nConf:  2\n")
    assert parse_lrs_text(good) == "IT'S NS FINE"
    bad = tmp_path / "b.txt"
    bad.write_text("just some words\n")
    with pytest.raises(DataError, match=r"b\.txt: expected the LRS header line 'Text:"):
        parse_lrs_text(bad)


def test_a_bad_transcript_leaves_an_existing_manifest_untouched(lrs3, tmp_path):
    import shutil

    corpus = tmp_path / "c"
    shutil.copytree(lrs3, corpus)
    out = tmp_path / "m.jsonl"
    out.write_text("previous manifest\n")
    (corpus / "trainval" / "spkA" / "00002.txt").write_text("no header here\n")
    with pytest.raises(DataError, match=r"00002\.txt"):
        build_manifest("lrs", corpus, out)
    assert out.read_text() == "previous manifest\n" and sorted(p.name for p in tmp_path.iterdir()) == ["c", "m.jsonl"]


def test_folder_without_the_layout_is_refused(tmp_path):
    (tmp_path / "flat").mkdir()
    write_mp4(tmp_path / "flat" / "a.mp4", moving_frames())
    with pytest.raises(DataError, match="<split>/<speaker or video id>/<utt>.mp4"):
        build_manifest("lrs", tmp_path / "flat", tmp_path / "m.jsonl")
    with pytest.raises(DataError, match=r"no split folder \['dev'\]"):
        list(scan_lrs(tmp_path, splits=["dev"]))
    assert not (tmp_path / "m.jsonl").exists()


# ---------------------------------------------------------------------------------------------- auto_avsr


@pytest.fixture(scope="module")
def avsr(tmp_path_factory):
    """root/lrs3/lrs3_video_seg24s/trainval/v1/{00001,00002}.mp4 (+ .wav), text mirror for 00001 only, label CSV
    in root/labels/, units file."""
    root = tmp_path_factory.mktemp("avsr")
    vdir = root / "lrs3" / "lrs3_video_seg24s" / "trainval" / "v1"
    tdir = root / "lrs3" / "lrs3_text_seg24s" / "trainval" / "v1"
    vdir.mkdir(parents=True)
    tdir.mkdir(parents=True)
    for utt in ("00001", "00002"):
        write_mp4(vdir / f"{utt}.mp4", moving_frames())
        write_wav(vdir / f"{utt}.wav", tone())
    (tdir / "00001.txt").write_text("GOOD MORNING")
    (root / "labels").mkdir()
    csv = root / "labels" / "lrs3_train_transcript_lengths_seg24s.csv"
    csv.write_text("lrs3,lrs3_video_seg24s/trainval/v1/00001.mp4,6,11 12\n"
                   "lrs3,lrs3_video_seg24s/trainval/v1/00002.mp4,6,13 14 15\n")
    units = root / "unigram5000_units.txt"
    units.write_text("<unk> 1\n\u2581GOOD 11\n\u2581MORNING 12\n\u2581HEL 13\nLO 14\n\u2581WORLD 15\n")
    return root, csv, units


def test_auto_avsr_label_list(avsr, tmp_path):
    root, csv, units = avsr
    out = tmp_path / "m.jsonl"
    assert main(["data", "manifest", str(csv), "--units", str(units), "--out", str(out)]) == 0
    rows = read_rows(out)
    assert [r["id"] for r in rows] == ["lrs3/lrs3_video_seg24s/trainval/v1/00001",
                                       "lrs3/lrs3_video_seg24s/trainval/v1/00002"]
    assert [r["transcript"] for r in rows] == ["GOOD MORNING", "HELLO WORLD"]  # text file, then token ids
    assert all(r["frames"] == 6 and r["speaker"] == "v1" and r["audio"].endswith(".wav") for r in rows)
    records = read_av_manifest(out)
    assert records[1].video.resolve() == root / "lrs3" / "lrs3_video_seg24s" / "trainval" / "v1" / "00002.mp4"
    assert records[1].extra == {"frames": 6}
    # without the units file the clip without a text mirror is unlabelled
    items = list(read_auto_avsr_labels(csv))
    assert [i.transcript for i in items] == ["GOOD MORNING", None]


@pytest.mark.parametrize("line, message", [
    ("lrs3,lrs3_video_seg24s/trainval/v1/00001.mp4,6\n", "expected 4 comma-separated fields"),
    ("lrs3,lrs3_video_seg24s/trainval/v1/00009.mp4,6,11\n", "00009.mp4 does not exist"),
    ("lrs3,lrs3_video_seg24s/trainval/v1/00001.mp4,six,11\n", "frames must be a whole number"),
    ("lrs3,lrs3_video_seg24s/trainval/v1/00002.mp4,6,99\n", "token id '99' is not in the units file"),
])
def test_auto_avsr_errors_name_the_line(avsr, tmp_path, line, message):
    root, _, units = avsr
    csv = tmp_path / "bad.csv"
    csv.write_text("lrs3,lrs3_video_seg24s/trainval/v1/00001.mp4,6,11 12\n" + line)
    with pytest.raises(DataError, match=message) as e:
        build_manifest("auto_avsr", csv, tmp_path / "m.jsonl", root=root, units=units)
    assert f"{csv}:2" in str(e.value) and not (tmp_path / "m.jsonl").exists()


def test_cli_reports_characters_outside_the_vocabulary(lrs3, tmp_path, capsys):
    import shutil

    corpus = tmp_path / "c"
    shutil.copytree(lrs3, corpus)
    (corpus / "test" / "spkB" / "00001.txt").write_text("Text:  ROOM 101\n")
    assert main(["data", "manifest", str(corpus), "--out", str(tmp_path / "m.jsonl"), "--audio", "none"]) == 0
    out = capsys.readouterr().out
    assert "3 utterances, 2 with transcripts, 1 unlabelled" in out
    assert "1 transcripts have characters outside" in out and "test/spkB/00001 ('01')" in out
    assert main(["data", "manifest", str(corpus), "--out", str(tmp_path / "x.jsonl"), "--units", "u.txt"]) == 2
