"""Config loading: typed dataclasses, errors that name file, key and the closest valid key."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from xmodal.config import (
    JOBS,
    LossSpec,
    TrainConfig,
    apply_overrides,
    dump_yaml,
    from_dict,
    load_job_config,
    load_yaml,
    register_job,
)
from xmodal.errors import ConfigError


@dataclass
class Model:
    name: str
    layers: int = 2


@dataclass
class Cfg:
    model: Model
    train: TrainConfig = field(default_factory=TrainConfig)
    losses: list[LossSpec] = field(default_factory=list)
    mode: Literal["fast", "slow"] = "fast"
    note: str | None = None


def test_nested_dataclasses_and_defaults():
    cfg = from_dict(Cfg, {"model": {"name": "ViT-B-32"}, "train": {"lr": "1e-4", "steps": 10},
                          "losses": [{"name": "affinity", "params": {"scale": 50}}]})
    assert cfg.model == Model("ViT-B-32", 2)
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.train.steps == 10 and cfg.train.batch_size == 64
    assert cfg.losses[0] == LossSpec("affinity", 1.0, {"scale": 50})


def test_unknown_key_names_file_key_and_suggestion():
    with pytest.raises(ConfigError, match=r"job\.yaml: unknown key 'train\.lrr' \(did you mean 'lr'\?\)"):
        from_dict(Cfg, {"model": {"name": "x"}, "train": {"lrr": 1}}, source="job.yaml")


def test_wrong_type_names_key_and_types():
    with pytest.raises(ConfigError, match=r"key 'train\.steps': expected int, got str 'many'"):
        from_dict(Cfg, {"model": {"name": "x"}, "train": {"steps": "many"}})
    with pytest.raises(ConfigError, match=r"key 'train\.steps': expected int, got bool"):
        from_dict(Cfg, {"model": {"name": "x"}, "train": {"steps": True}})
    with pytest.raises(ConfigError, match=r"key 'mode': expected one of 'fast', 'slow'.*did you mean 'fast'"):
        from_dict(Cfg, {"model": {"name": "x"}, "mode": "fats"})


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"cfg\.yaml: missing required key 'model\.name'"):
        from_dict(Cfg, {"model": {}}, source="cfg.yaml")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_yaml(lst)


def test_yaml_cannot_run_code(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("a: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(evil)


def test_overrides():
    data = {"train": {"lr": 0.1}, "model": {"name": "a"}}
    out = apply_overrides(data, ["train.lr=1e-3", "model.layers=4", "new.deep.key=[1, 2]", "model.name=ViT-B/32"])
    assert out["model"]["layers"] == 4 and out["new"]["deep"]["key"] == [1, 2]
    assert from_dict(TrainConfig, out["train"]).lr == 1e-3  # YAML 1.1 reads 1e-3 as text; typing converts it
    assert out["model"]["name"] == "ViT-B/32"
    assert data["train"]["lr"] == 0.1  # input untouched
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        apply_overrides(data, ["train.lr"])
    with pytest.raises(ConfigError, match="'train.lr' is a float, not a mapping"):
        apply_overrides(data, ["train.lr.x=1"])


@pytest.fixture
def toy_job():
    @dataclass
    class ToyCfg:
        model: Model
        steps: int = 1

    name = "toy_test_job"
    if name not in JOBS:
        register_job(name, ToyCfg)(lambda cfg: {"ran": cfg.steps})
    return name


def test_job_config(tmp_path, toy_job):
    f = tmp_path / "job.yaml"
    f.write_text(f"job: {toy_job}\nmodel: {{name: m}}\nsteps: 3\n")
    name, cfg = load_job_config(f, ["steps=5"])
    assert name == toy_job and cfg.steps == 5 and cfg.model.name == "m"
    assert "steps: 5" in dump_yaml(cfg)
    f.write_text("model: {name: m}\n")
    with pytest.raises(ConfigError, match="missing required key 'job'"):
        load_job_config(f)
    f.write_text("job: toy_test_jbo\nmodel: {name: m}\n")
    with pytest.raises(ConfigError, match="unknown job 'toy_test_jbo'.*did you mean 'toy_test_job'"):
        load_job_config(f)


def test_cli_config_show(tmp_path, toy_job, capsys):
    from xmodal.cli import main

    f = tmp_path / "job.yaml"
    f.write_text(f"job: {toy_job}\nmodel: {{name: m}}\n")
    assert main(["config", "show", str(f), "--set", "model.layers=7"]) == 0
    out = capsys.readouterr().out
    assert f"job: {toy_job}" in out and "layers: 7" in out
    f.write_text(f"job: {toy_job}\nmodel: {{name: m, layrs: 3}}\n")
    assert main(["config", "show", str(f)]) == 2
    assert "unknown key 'model.layrs' (did you mean 'layers'?)" in capsys.readouterr().err


def test_fixed_length_tuples():
    @dataclass
    class Blocks:
        sizes: tuple[int, int, float] = (1, 2, 0.5)

    assert from_dict(Blocks, {"sizes": [3, 4, 1]}).sizes == (3, 4, 1.0)
    with pytest.raises(ConfigError, match=r"key 'sizes\[1\]': expected int, got str"):
        from_dict(Blocks, {"sizes": [3, "x", 1]})
    with pytest.raises(ConfigError, match="needs exactly 3 items"):
        from_dict(Blocks, {"sizes": [3, 4]})


def test_loss_names_and_parameters_are_checked_when_the_config_is_loaded(tmp_path, toy_job, capsys):
    """Not after the data and the teacher are loaded: `config show` already refuses, naming file, key and fix."""
    from xmodal.cli import main

    @dataclass
    class WithLosses:
        model: Model
        losses: list[LossSpec] = field(default_factory=list)

    ok = from_dict(WithLosses, {"model": {"name": "m"}, "losses": [{"name": "clip"}, {"name": "affinity"}]})
    assert [s.name for s in ok.losses] == ["clip", "affinity"]
    with pytest.raises(ConfigError, match=r"job\.yaml: key 'losses\[1\]\.name': unknown loss 'afinity' "
                                          r"\(did you mean 'affinity'\?\)"):
        from_dict(WithLosses, {"model": {"name": "m"}, "losses": [{"name": "clip"}, {"name": "afinity"}]},
                  source="job.yaml")
    with pytest.raises(ConfigError, match=r"key 'losses\[0\]\.params': loss 'affinity': unknown parameter "
                                          r"'scal' \(did you mean 'scale'\?\)"):
        from_dict(WithLosses, {"model": {"name": "m"}, "losses": [{"name": "affinity", "params": {"scal": 5}}]})
    with pytest.raises(ConfigError, match=r"key 'losses\[0\]\.weight': must be a finite number"):
        from_dict(WithLosses, {"model": {"name": "m"}, "losses": [{"name": "clip", "weight": float("nan")}]})

    name = "toy_losses_job"
    if name not in JOBS:
        register_job(name, WithLosses)(lambda cfg: {})
    f = tmp_path / "job.yaml"
    f.write_text(f"job: {name}\nmodel: {{name: m}}\nlosses: [{{name: afinity}}]\n")
    assert main(["config", "show", str(f)]) == 2
    err = capsys.readouterr().err
    assert f"{f}: key 'losses[0].name': unknown loss 'afinity' (did you mean 'affinity'?)" in err
