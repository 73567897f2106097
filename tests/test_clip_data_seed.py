"""The CLIP job's training data follows train.seed: caption choice is a function of (seed, image key, epoch)."""

from pathlib import Path

import pytest
import torch

from xmodal.config import LossSpec, TrainConfig
from xmodal.tasks.clip import job as clip_job
from xmodal.tasks.clip.config import ClipModelConfig, DataConfig
from xmodal.tasks.clip.data import View

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _write_csv(tmp_path: Path) -> Path:
    from PIL import Image

    rows = ["filepath\ttitle"]
    for i in range(16):
        Image.new("RGB", (8, 8), (i * 10, 0, 0)).save(tmp_path / f"{i}.png")
        rows += [f"{i}.png\tcaption {i} {k}" for k in range(4)]
    path = tmp_path / "train.tsv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_paired_dataset_draws_captions_from_the_given_seed(tmp_path):
    path = _write_csv(tmp_path)
    cfg = DataConfig(train=str(path), caption_sampling="random")
    view = [View(lambda im: im.size, lambda texts: texts)]

    def captions(seed: int) -> list[str]:
        ds = clip_job.paired_dataset(path, view, cfg, seed=seed)
        return [ds[i]["text"] for i in range(len(ds))]

    assert captions(1) == captions(1)
    assert captions(1) != captions(2)


def test_training_uses_train_seed_for_the_data(tmp_path, monkeypatch):
    """train_clip hands train.seed to the data set (it used to build it with seed 0 whatever the config)."""
    seen = []
    real = clip_job.paired_dataset

    def spy(path, views, cfg, seed=0):
        seen.append(seed)
        return real(path, views, cfg, seed=seed)

    class Stop(Exception):
        pass

    def no_training(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(clip_job, "paired_dataset", spy)
    monkeypatch.setattr("xmodal.engine.Distiller", no_training)
    path = _write_csv(tmp_path)
    model = clip_job.load_clip(ClipModelConfig(model_cfg=TINY), torch.device("cpu"))
    with pytest.raises(Stop):
        clip_job.train_clip(model, clip_job.DataPaths(path, None, None, None), DataConfig(train=str(path)),
                            TrainConfig(steps=1, batch_size=4, seed=7), tmp_path / "run", losses=[LossSpec("clip")],
                            device=torch.device("cpu"))
    assert seen == [7]


def test_a_cache_built_for_one_train_file_is_refused_for_another(tmp_path, capsys):
    """Training checks the cache against its own data: a cache of train.csv does not teach from other.csv (the
    cache's recorded files are unchanged, so only the run's data-aware teacher fingerprint can tell)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_teacher_cache import clip_config

    from xmodal.cli import main

    cache = tmp_path / "cache"
    assert main(["cache", str(clip_config(tmp_path)), "--out", str(cache), "--no-progress"]) == 0
    train = tmp_path / "data" / "train.csv"
    lines = train.read_text().splitlines()
    other = tmp_path / "data" / "other.csv"
    other.write_text("\n".join([lines[0], *lines[1:][::-1][:-1], lines[1] + " again"]) + "\n")
    cfg = clip_config(tmp_path, "cached.yaml", cache=cache)
    first = "  caption_sampling: first\n"
    cfg.write_text(cfg.read_text().replace(first, first + "  train: other.csv\n"))
    capsys.readouterr()
    assert main(["distill", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"teacher cache {cache}" in err and "xmodal cache" in err
