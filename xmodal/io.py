"""Atomic file writes: a crash or Ctrl-C never leaves a half-written checkpoint, cache or report.

Files and folders made here follow the process umask like any other tool (temp files from `mkstemp` and
`mkdtemp` would otherwise be owner-only).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch


def current_umask() -> int:
    """The process umask, read from /proc where possible (setting it to read it back races with other threads)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode `open(path, "w")` would give a new file: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def default_dir_mode() -> int:
    """The mode `mkdir` would give a new folder: 0o777 less the umask."""
    return 0o777 & ~current_umask()


def make_temp_dir(parent: str | os.PathLike, prefix: str = "", suffix: str = "") -> Path:
    """A new uniquely named folder in `parent` with the usual permissions (mkdtemp alone makes it 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    os.chmod(path, default_dir_mode())
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write to a temporary file in the target folder, fsync it, then `os.replace` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, default_file_mode())  # mkstemp makes it 0600; the finished file follows the umask
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=str) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line; a single small write so a crash leaves at most a truncated last line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, default=float) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)


def record_matches(path: str | os.PathLike, expected: dict) -> bool | None:
    """Whether the JSON record at `path` (a generated data set's description) holds `expected`'s values: True,
    False when it describes something else, None when there is no readable record."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        have = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return {k: have.get(k) for k in expected} == expected
