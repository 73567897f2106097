"""Weight files whose pickle would run code are refused with a CheckpointError naming the file (exit code 2 from
the CLI): the code never runs, and xmodal never suggests loading such a file unsafely."""

import json
import os

import pytest
import torch

from xmodal.errors import CheckpointError

TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 1, "width": 32, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


class RunsCode:
    """Pickles to a call of exec: unpickling it unsafely would write the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def evil_weights(path, marker):
    torch.save({"state_dict": {"visual.proj": RunsCode(marker)}}, path)
    return path


def check_refusal(message, path, marker) -> None:
    """A refusal naming the file and what it asked for; no unsafe advice, not even in a chained traceback."""
    if isinstance(message, BaseException):
        assert message.__cause__ is None and message.__suppress_context__
        message = str(message)
    assert str(path) in message and "refused to load" in message and "pickled Python objects" in message
    assert "(it asks for exec)" in message  # what the file wanted to run, not how to run it
    assert "weights_only" not in message and "likely succeed" not in message
    assert not os.path.exists(marker)


@pytest.fixture
def tiny_data(tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "a.png")
    data = tmp_path / "data.csv"
    data.write_text("filepath,title\na.png,a red square\n")
    return data


def test_malicious_open_clip_folder_is_refused_by_name(tmp_path, tiny_data, capsys):
    """`--model DIR` and `teacher.model: DIR` whose weights file would run code: a CheckpointError naming the
    file (exit code 2 from the CLI); the code never runs and xmodal never suggests loading it unsafely."""
    from xmodal.cli import main
    from xmodal.tasks.clip.config import TeacherConfig
    from xmodal.tasks.clip.job import load_clip

    folder = tmp_path / "evil_clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY, "preprocess_cfg": {}}))
    marker = tmp_path / "marker"
    weights = evil_weights(folder / "open_clip_pytorch_model.bin", marker)

    assert main(["eval", "retrieval", "--model", str(folder), "--data", str(tiny_data), "--no-cache",
                 "--no-progress", "--device", "cpu"]) == 2
    check_refusal(capsys.readouterr().err, weights, marker)
    with pytest.raises(CheckpointError) as info:
        load_clip(TeacherConfig(model=str(folder)), torch.device("cpu"))
    check_refusal(info.value, weights, marker)


def test_malicious_pretrained_file_is_refused_by_name(tmp_path, tiny_data, capsys):
    import open_clip

    from xmodal.cli import main
    from xmodal.teachers.clip import load_open_clip

    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "xmodal-test-tiny.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(configs / "xmodal-test-tiny.json")
    marker = tmp_path / "marker"
    weights = evil_weights(tmp_path / "evil.pt", marker)
    assert main(["eval", "retrieval", "--model", "xmodal-test-tiny", "--pretrained", str(weights), "--data",
                 str(tiny_data), "--no-cache", "--no-progress", "--device", "cpu"]) == 2
    check_refusal(capsys.readouterr().err, weights, marker)
    with pytest.raises(CheckpointError) as info:
        load_open_clip("xmodal-test-tiny", str(weights))
    check_refusal(info.value, weights, marker)


def test_malicious_speech_teacher_files_are_refused_by_name(tmp_path):
    from xmodal.teachers.speech import load_speech_recognizer, load_wav2vec2

    marker = tmp_path / "marker"
    weights = evil_weights(tmp_path / "teacher.pt", marker)
    for load in (load_wav2vec2, load_speech_recognizer):
        with pytest.raises(CheckpointError) as info:
            load(str(weights))
        check_refusal(info.value, weights, marker)
