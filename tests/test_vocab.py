import pytest

from xmodal.data.vocab import IGNORE_ID, CharVocab
from xmodal.errors import ConfigError, DataError


def test_layout_follows_espnet():
    v = CharVocab()
    assert v.blank == 0 and v.sos == 1 and v.eos == 1
    assert v.tokens[:2] == ("<blank>", "<sos/eos>")
    assert v.tokens[2] == " " and v.tokens[3] == "'" and v.tokens[-1] == "z"
    assert len(v) == 2 + 28
    assert IGNORE_ID == -1


def test_encode_decode_roundtrip():
    v = CharVocab()
    text = "bin blue at f two now"
    ids = v.encode(text)
    assert min(ids) >= 2 and len(ids) == len(text)
    assert v.decode(ids) == text
    # blank, sos/eos and padding are dropped
    assert v.decode([0, 1] + ids + [1, IGNORE_ID, IGNORE_ID]) == text


def test_decode_rejects_ids_outside_vocabulary():
    with pytest.raises(DataError, match="outside the vocabulary"):
        CharVocab().decode([2, 99])


def test_normalize():
    v = CharVocab()
    assert v.normalize("  Hello,   World!  It\u2019s  well-known. ") == "hello world it's well known"
    assert v.normalize("SET\tBLUE\nAT A") == "set blue at a"
    assert v.normalize("") == ""


def test_oov_error_names_sample_and_characters():
    v = CharVocab()
    with pytest.raises(DataError) as e:
        v.encode("set blue at 7 now!", sample_id="s01_0007")
    msg = str(e.value)
    assert "s01_0007" in msg and "'7'" in msg and "'!'" in msg


def test_custom_vocabulary_and_validation():
    v = CharVocab("ab")
    assert len(v) == 4 and v.encode("ba") == [3, 2]
    assert CharVocab.from_dict(v.to_dict()) == v
    with pytest.raises(ConfigError, match="duplicate"):
        CharVocab("aba")
    with pytest.raises(ConfigError, match="single characters"):
        CharVocab(["ab", "c"])
    with pytest.raises(ConfigError, match="chars"):
        CharVocab.from_dict({})
