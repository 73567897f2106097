"""`xmodal info`: versions, devices and thread counts, for bug reports and sanity checks."""

from __future__ import annotations

import argparse
import importlib
import os
import platform

from xmodal.commands import register_command

PACKAGES = ("torch", "torchvision", "torchaudio", "open_clip", "faiss", "decord", "av", "numpy")


def collect_info() -> dict:
    import torch

    from xmodal import __version__

    info = {
        "xmodal": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda_available": torch.cuda.is_available(),
        "devices": ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())],
    }
    for name in PACKAGES:
        try:
            mod = importlib.import_module(name)
            info[name] = getattr(mod, "__version__", "installed")
        except Exception as e:  # report, never crash: this command exists to diagnose broken installs
            info[name] = f"unavailable ({type(e).__name__}: {e})"
    try:
        import faiss

        info["faiss_threads"] = faiss.omp_get_max_threads()
    except Exception:
        info["faiss_threads"] = None
    return info


def run(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.json:
        import json

        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print as JSON")


register_command("info", "print versions, devices and thread counts", configure, run)
