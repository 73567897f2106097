"""Every example config validates against its job's typed config, so examples never rot."""

from pathlib import Path

import pytest

from xmodal.config import load_job_config

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_validates(path):
    job, cfg = load_job_config(path)
    assert job and cfg is not None
