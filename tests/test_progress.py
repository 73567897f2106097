"""Long work reports progress as occasional log lines when output is not a terminal, and as a tqdm bar on one."""

from __future__ import annotations

import logging

import xmodal.progress as prog


def test_off_a_terminal_progress_is_plain_lines(monkeypatch, caplog):
    monkeypatch.setattr(prog, "_is_terminal", lambda: False)
    caplog.set_level(logging.INFO, logger="xmodal.progress")
    items = list(prog.progress(range(5), desc="synthetic-scenes", unit="img", every=0.0))
    assert items == [0, 1, 2, 3, 4]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("synthetic-scenes: 1/5 img (") and "ETA" in lines[0]
    assert lines[-1].startswith("synthetic-scenes: 5/5 img") and lines[-1].endswith(", done")
    assert not any("\r" in line for line in lines)


def test_lines_are_spaced_out_and_short_work_stays_quiet(monkeypatch, caplog):
    monkeypatch.setattr(prog, "_is_terminal", lambda: False)
    caplog.set_level(logging.INFO, logger="xmodal.progress")
    with prog.progress(total=1000, desc="teacher cache", unit="sample") as bar:  # every 30 s: nothing in this test
        for _ in range(1000):
            bar.update(1)
    assert caplog.records == []
    bar = prog.progress(total=10, desc="quiet", enabled=False, every=0.0)
    bar.update(10)
    bar.close()
    assert caplog.records == []


def test_on_a_terminal_it_is_a_tqdm_bar(monkeypatch):
    from tqdm.auto import tqdm

    monkeypatch.setattr(prog, "_is_terminal", lambda: True)
    bar = prog.progress(total=3, desc="x", enabled=False)
    assert isinstance(bar, tqdm)
    bar.close()
