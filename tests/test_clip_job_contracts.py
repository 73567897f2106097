"""CLIP job contracts: the data follows train.seed, a cache is checked against the run's data, the in-job teacher
follows its own recipe, and a resume with nothing to resume fails before any teacher work."""

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


def test_in_job_teacher_does_not_depend_on_the_callers_rng(tmp_path):
    """`xmodal cache` and `xmodal distill` train the same teacher for the same recipe: its initial weights come
    from teacher.train.seed, not from whatever the global RNG held (two cache builds used to differ)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_teacher_cache import clip_config

    from xmodal.config import load_job_config
    from xmodal.fingerprint import model_fingerprint

    _, cfg = load_job_config(clip_config(tmp_path, teacher_train=True))
    paths = clip_job.resolve_data(cfg.data)
    weights = []
    for i, rng_seed in enumerate((1, 2)):
        torch.manual_seed(rng_seed)
        teacher = clip_job.obtain_teacher(cfg.teacher, paths, cfg.data, tmp_path / f"run{i}", torch.device("cpu"))
        weights.append(model_fingerprint(teacher.model))
    assert weights[0] == weights[1]


def test_resume_with_nothing_to_resume_fails_before_the_teacher(tmp_path, monkeypatch):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_teacher_cache import clip_config

    from xmodal.config import JOBS, load_job_config
    from xmodal.errors import CheckpointError

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded or trained before the resume was refused")

    monkeypatch.setattr(clip_job, "obtain_teacher", no_teacher)
    name, cfg = load_job_config(clip_config(tmp_path, teacher_train=True))
    cfg.resume = "latest"
    with pytest.raises(CheckpointError, match="nothing to resume"):
        JOBS.get(name).run(cfg)


_HOLD = """
import sys, time
from pathlib import Path
from xmodal.lock import FolderLock
lock = FolderLock(sys.argv[1], "run folder").acquire()
Path(sys.argv[2]).write_text("held")
time.sleep(float(sys.argv[3]))
Path(sys.argv[2]).write_text("released")
lock.release()
"""


def test_runs_side_by_side_wait_for_the_teacher_another_process_trains(tmp_path):
    """A second run that needs the teacher a first run is training waits for it (it used to fail at once with
    the run folder's LockedError), then goes on."""
    import subprocess
    import sys
    import time

    sys.path.insert(0, str(Path(__file__).parent))
    from test_teacher_cache import clip_config

    from xmodal.config import load_job_config
    from xmodal.fingerprint import model_fingerprint

    _, cfg = load_job_config(clip_config(tmp_path, teacher_train=True))
    paths = clip_job.resolve_data(cfg.data)
    first = clip_job.obtain_teacher(cfg.teacher, paths, cfg.data, tmp_path / "run0", torch.device("cpu"))
    (key,) = [p.name for p in (tmp_path / "run0" / "teacher").iterdir()]
    folder, marker = tmp_path / "run1" / "teacher" / key, tmp_path / "marker"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder), str(marker), "1.5"])
    try:
        while not marker.exists():
            assert holder.poll() is None, "the lock-holding process ended early"
            time.sleep(0.05)
        second = clip_job.obtain_teacher(cfg.teacher, paths, cfg.data, tmp_path / "run1", torch.device("cpu"))
        assert marker.read_text() == "released"  # it waited for the holder instead of refusing
    finally:
        holder.wait(timeout=60)
    assert model_fingerprint(second.model) == model_fingerprint(first.model)


def test_a_random_weight_teacher_is_the_same_in_every_process(tmp_path):
    """A teacher given only model_cfg (no weights, no teacher.train) is initialised from a fixed seed, without
    touching the caller's RNG: xmodal cache, xmodal distill and every torchrun rank build the same one."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_teacher_cache import TINY_CLIP

    from xmodal.fingerprint import model_fingerprint
    from xmodal.tasks.clip.config import TeacherConfig

    prints = []
    for rng_seed in (1, 2):
        torch.manual_seed(rng_seed)
        before = torch.random.get_rng_state()
        teacher = clip_job.obtain_teacher(TeacherConfig(model_cfg=json.loads(json.dumps(TINY_CLIP))), None, None,
                                          tmp_path, torch.device("cpu"))
        assert torch.equal(torch.random.get_rng_state(), before)
        prints.append(model_fingerprint(teacher.model))
    assert prints[0] == prints[1]
