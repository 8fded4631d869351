"""What the experiments share: worker pools with pinned threads, and the machine a run was measured on."""

from __future__ import annotations

import os
import platform
from concurrent.futures import ProcessPoolExecutor

import torch


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


class _Inline:
    """The executor interface, run in this process (quick mode, or workers=1)."""

    def __init__(self, threads: int):
        self.threads, self.saved = threads, torch.get_num_threads()

    def __enter__(self):
        torch.set_num_threads(self.threads)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)

    def map(self, fn, items):
        return map(fn, list(items))


def executor(config):
    """Worker processes (spawned, `config.threads` torch threads each) or, with `config.workers == 1`, this process."""
    if config.workers == 1:
        return _Inline(config.threads)
    import multiprocessing

    return ProcessPoolExecutor(config.workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(config.threads,))


def machine_info(config) -> dict:
    """What a timing needs beside it: cores, versions, workers and threads, and the load average at the start."""
    return {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "workers": config.workers, "threads_per_process": config.threads,
            "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
