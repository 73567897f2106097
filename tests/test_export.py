"""Export to open_clip: the folder loads in plain open_clip (xmodal not importable) and gives the same embeddings."""

import json
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch
from torch import nn

from xmodal.cli import main
from xmodal.errors import CheckpointError, ConfigError
from xmodal.io import atomic_torch_save
from xmodal.students.clip import create_student, shrink_model_cfg
from xmodal.students.export import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    export_open_clip,
    export_run,
    strip_prefix,
    write_student_config,
)
from xmodal.students.inheritance import inherit_weights

TEACHER = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 4},
}
STUDENT = shrink_model_cfg(TEACHER, {"vision": {"layers": 2, "width": 0.5}, "text": {"layers": 2, "width": 0.5}})


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    teacher = create_student(TEACHER).eval()
    model = create_student(STUDENT, {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}).eval()
    inherit_weights(teacher, model, channels="importance")
    return model


def inputs():
    g = torch.Generator().manual_seed(7)
    return torch.randn(3, 3, 32, 32, generator=g), torch.randint(1, 49407, (3, 16), generator=g)


def test_export_loads_in_plain_open_clip_without_xmodal(student, tmp_path):
    out = export_open_clip(student, STUDENT, tmp_path / "exported")
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["model_cfg"] == STUDENT and config["preprocess_cfg"]["mean"] == [0.5, 0.5, 0.5]
    img, txt = inputs()
    torch.save({"image": img, "text": txt}, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.path.append({sysconfig.get_paths()["purelib"]!r})
        import importlib.util
        assert importlib.util.find_spec("xmodal") is None, "xmodal must not be importable here"
        import open_clip, torch
        model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{out}")
        model.eval()
        x = torch.load({str(tmp_path / "inputs.pt")!r}, weights_only=True)
        with torch.no_grad():
            emb = {{"image": model.encode_image(x["image"]), "text": model.encode_text(x["text"])}}
        tok = open_clip.get_tokenizer("local-dir:{out}")
        assert tok(["a red circle"]).shape == (1, 16)
        assert list(model.visual.preprocess_cfg["mean"]) == [0.5, 0.5, 0.5], model.visual.preprocess_cfg
        assert "xmodal" not in sys.modules
        torch.save(emb, {str(tmp_path / "emb.pt")!r})
    """)
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    emb = torch.load(tmp_path / "emb.pt", weights_only=True)
    with torch.no_grad():
        assert torch.allclose(emb["image"], student.encode_image(img), atol=1e-6)
        assert torch.allclose(emb["text"], student.encode_text(txt), atol=1e-6)


class Wrapper(nn.Module):
    """Stands in for a training job's student module: the CLIP under a prefix plus extra heads."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        self.head = nn.Linear(4, 4)


def make_run(tmp_path, student, *, state_prefix="clip.", pointer=True):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    state = Wrapper(student).state_dict() if state_prefix == "clip." else student.state_dict()
    atomic_torch_save({"model": state, "step": 5, "config": {"job": "clip"}}, run / "checkpoints" / "step_0000005.pt")
    if pointer:
        (run / "checkpoints" / "latest").write_text("step_0000005.pt\n")
    write_student_config(run, STUDENT, {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    return run


def test_cli_export_finds_prefix_and_checkpoint(student, tmp_path, capsys):
    import open_clip

    run = make_run(tmp_path, student)
    assert main(["export", str(run), "--format", "open_clip"]) == 0
    out = run / "export" / "open_clip"
    assert str(out) in capsys.readouterr().out
    model = open_clip.create_model(f"local-dir:{out}").eval()
    img, txt = inputs()
    with torch.no_grad():
        assert torch.equal(model.encode_image(img), student.encode_image(img))
        assert torch.equal(model.encode_text(txt), student.encode_text(txt))
    # existing output: refused without --overwrite, replaced with it
    assert main(["export", str(run)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(run), "--overwrite", "--prefix", "clip."]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging folders left


def test_unprefixed_state_and_step_file_fallback(student, tmp_path):
    run = make_run(tmp_path, student, state_prefix="", pointer=False)
    out = export_run(run, out_dir=tmp_path / "plain")
    assert (out / WEIGHTS_NAME).is_file()


def test_prefix_errors_list_what_exists(student):
    state = {f"model.student.{k}": v for k, v in student.state_dict().items()}
    expected = set(student.state_dict())
    assert set(strip_prefix(state, expected)) == expected
    with pytest.raises(CheckpointError, match=r"with prefix 'clip\.'.*missing.*prefixes present: 'model\.'"):
        strip_prefix(state, expected, "clip.")
    partial = {k: v for k, v in state.items() if "visual" not in k}
    with pytest.raises(CheckpointError, match=r"no prefix.*prefixes present: 'model\.' \(\d+ keys\)"):
        strip_prefix(partial, expected)
    # the same CLIP held twice (e.g. by an image and a text adapter) is fine; two different ones are ambiguous
    twice = state | {f"other.{k}": v for k, v in student.state_dict().items()}
    assert set(strip_prefix(twice, expected)) == expected
    differing = state | {f"other.{k}": v + 1 for k, v in student.state_dict().items()}
    with pytest.raises(CheckpointError, match="several prefixes"):
        strip_prefix(differing, expected)


def test_failed_export_leaves_nothing_behind(student, tmp_path):
    wrong_cfg = shrink_model_cfg(TEACHER, {"vision": {"layers": 3}})
    with pytest.raises(CheckpointError, match="do not fit the model_cfg"):
        export_open_clip(student, wrong_cfg, tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="lacks 'text_cfg'"):
        export_open_clip(student, {"embed_dim": 32, "vision_cfg": {}}, tmp_path / "bad")


def test_run_without_student_config_or_checkpoint(student, tmp_path, capsys):
    run = make_run(tmp_path, student)
    (run / "student_open_clip.json").unlink()
    with pytest.raises(ConfigError, match="--model-config"):
        export_run(run)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(STUDENT))  # a bare model_cfg is accepted too
    assert export_run(run, model_config=cfg, out_dir=tmp_path / "o").is_dir()
    assert main(["export", str(run), "--model-config", str(cfg), "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_damaged_checkpoint_is_refused_naming_it(student, tmp_path, capsys):
    """`xmodal export` reads checkpoints through the checksum check: a flipped byte in a tensor (which torch.load
    reads without noticing) is refused naming the file, and nothing is exported."""
    from test_checkpoint import flip_tensor_byte

    from xmodal.engine.checkpoint import save_checkpoint

    run = make_run(tmp_path, student)
    ckpt = run / "checkpoints" / "step_0000005.pt"
    save_checkpoint({"model": Wrapper(student).state_dict(), "step": 5, "config": {"job": "clip"}}, ckpt)
    flip_tensor_byte(ckpt)
    assert main(["export", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{ckpt} is damaged: its blake2b checksum does not match" in err
    assert not (run / "export").exists()
