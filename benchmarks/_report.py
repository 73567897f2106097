"""Write one benchmark's section of BENCHMARKS.md, with the machine, the command and the date."""

from __future__ import annotations

import datetime
import fcntl
import os
import platform
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "BENCHMARKS.md"

HEADER = """# Benchmarks

Measured by the scripts in `benchmarks/`; each section says the machine, the command and the date.
Ratios are measured side by side in the same run. Re-run a script to refresh its section.
"""


def machine() -> str:
    """One line describing the CPU, cores, memory and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores{mem}, {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )


def write_section(key: str, title: str, body: str, command: str | None = None) -> Path:
    """Replace (or append) the section `key` of BENCHMARKS.md; safe against concurrent writers."""
    from xmodal.io import atomic_write_text

    command = command or "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = (
        f"<!-- section:{key} -->\n## {title}\n\n"
        f"- machine: {machine()}\n- command: `{command}`\n- date: {stamp}\n\n{body.strip()}\n"
        f"<!-- /section:{key} -->\n"
    )
    lock_path = ROOT / ".benchmarks.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = REPORT.read_text() if REPORT.exists() else HEADER
        pattern = re.compile(rf"<!-- section:{re.escape(key)} -->.*?<!-- /section:{re.escape(key)} -->\n", re.S)
        text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
        atomic_write_text(REPORT, text)
    return REPORT
