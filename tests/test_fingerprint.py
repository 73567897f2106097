"""The one fingerprint recipe: model weights + preprocessing + data, readable back part by part."""

import os

import pytest
import torch
from _edits import same_size_edit
from torch import nn

from xmodal.fingerprint import (
    DataIdentity,
    data_identity,
    describe_difference,
    file_digest,
    fingerprint,
    fingerprint_parts,
    model_fingerprint,
)


def test_data_identity_follows_content_not_size_or_name(tmp_path):
    data = tmp_path / "train.csv"
    data.write_text("filepath,title\na.png,a red cube\nb.png,a blue ball\n")
    before = data_identity({"train": data})
    assert before == data_identity({"train": data}) and before.files == {"train": str(data.resolve())}
    same_size_edit(data, "red", "tan")
    after = data_identity({"train": data})
    assert after.differences(before) == ["train"] and after.digest != before.digest
    assert before.changed_files() == [f"train ({data.resolve()}): its content changed"]
    assert after.changed_files() == []


def test_data_identity_parts_name_what_changed(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(b"png")
    base = data_identity(media=[img], vocab=" 'ab", transcripts=[["u1", "ab"]], classes=None)
    assert set(base.parts) == {"media", "vocab", "transcripts"}  # None settings are left out
    assert data_identity(media=[img], vocab=" 'ba", transcripts=[["u1", "ab"]]).differences(base) == ["vocab"]
    assert data_identity(media=[img], vocab=" 'ab", transcripts=[["u1", "ba"]]).differences(base) == ["transcripts"]
    os.utime(img, ns=(1, 1))  # an image replaced on disk: not re-read, but its state changed
    assert data_identity(media=[img], vocab=" 'ab", transcripts=[["u1", "ab"]]).differences(base) == ["media"]
    assert DataIdentity.from_dict(base.to_dict()) == base
    with pytest.raises(ValueError, match="part name"):
        data_identity(**{"a=b": 1})


def test_fingerprint_holds_model_and_data_parts(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    data = tmp_path / "m.jsonl"
    data.write_text('{"id": "u1", "transcript": "ab"}\n')
    ident = data_identity({"train": data}, vocab="ab")
    fp = fingerprint(model, {"size": 32}, data=ident)
    assert fp.startswith(model_fingerprint(model, {"size": 32}))
    base, parts = fingerprint_parts(fp)
    assert base == model_fingerprint(model, {"size": 32}) and parts == ident.parts
    assert fingerprint_parts(base) == (base, None)
    assert fingerprint(base, data=ident) == fp and fingerprint(model, {"size": 32}) == base

    assert describe_difference(fp, fp) is None
    assert describe_difference(fp, base) is None  # a model-only fingerprint asks only for the same model
    other_vocab = fingerprint(base, data=data_identity({"train": data}, vocab="ba"))
    assert describe_difference(fp, other_vocab) == "the data differ: vocab"
    with torch.no_grad():
        model.weight[0, 0] += 1
    assert "the teacher differs" in describe_difference(fp, fingerprint(model, {"size": 32}, data=ident))
    assert "records no data identity" in describe_difference(base, fp)


def test_file_digest_is_content_hash(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"xyz")
    b.write_bytes(b"xyz")
    assert file_digest(a) == file_digest(b)
    b.write_bytes(b"xyw")
    assert file_digest(a) != file_digest(b)
