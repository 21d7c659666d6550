"""Run per-case jobs here or in a process pool whose workers never outlive the run.

:func:`run_jobs` is what :func:`anatomask_lab.data.preprocess.preprocess_dataset` uses to prepare cases in
parallel. The first failing job stops the run; an error, SIGINT or SIGTERM kills the workers at once (instead of
letting them finish their cases), and a worker whose starter dies (even by SIGKILL) ends too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

__all__ = ["run_jobs"]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(starter: int) -> None:
    """Pool initializer: the worker ends when the process that started the run dies (even by SIGKILL).

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; everywhere: a daemon thread that watches ``os.getppid()``.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass

    parent = os.getppid()  # the starter, or a fork server that ends with it

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
    try:
        os.kill(starter, 0)
    except ProcessLookupError:  # the starter died before prctl took effect
        os._exit(1)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Kill the pool's workers now (on an error, SIGINT or SIGTERM) instead of letting them finish their cases."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            proc.kill()
    pool.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def _sigterm_as_exit():
    """In the main thread, turn SIGTERM into ``SystemExit`` so that the pool is stopped on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_pool(fn: Callable, jobs: Sequence, workers: int, bar) -> None:
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_die_with_parent, initargs=(os.getpid(),))
    try:
        with _sigterm_as_exit():
            pending = {pool.submit(fn, j) for j in jobs}
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                bar.update(len(done))
                failed = next((f for f in done if f.exception() is not None), None)
                if failed is not None:
                    raise failed.exception()
    except BaseException:
        _stop_workers(pool)
        raise
    pool.shutdown(wait=True)


def run_jobs(fn: Callable, jobs: Sequence, workers: int, desc: str, progress: bool) -> None:
    """Call ``fn(job)`` for every job, here (``workers <= 1``) or in a process pool; the first error stops the run.

    Args:
        fn: a module-level function (picklable), called once per job.
        jobs: picklable job arguments.
        workers: processes; 0 or 1 runs in this process, in order.
        desc: label of the tqdm bar.
        progress: show the bar.

    Raises:
        Whatever the first failing job raised; the other workers are killed first.
    """
    from anatomask_lab.progress import progress as progress_bar

    with progress_bar(total=len(jobs), desc=desc, unit="case", disable=not progress) as bar:
        if workers <= 1:
            for job in jobs:
                fn(job)
                bar.update()
            return
        _run_pool(fn, jobs, workers, bar)
