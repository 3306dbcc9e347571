"""Worker processes for the evaluation stages that split cleanly into independent tasks (byte ranges
of a submission file or of the annotation table).

Each worker is a fresh interpreter that reads pickled messages on stdin and writes pickled results on
stdout: it inherits no threads, CUDA state or ``__main__`` of the calling process. A run sends each
worker the function and its shared argument once (the worker is idle then), then small tasks, a few
ahead, so no pipe can fill while both ends write. Tasks are dealt round-robin and their results read
back in task order, so the output does not depend on the number of workers. The workers of a process
are started on first use and kept for later evaluations (:func:`shutdown_workers` stops them).
``workers <= 1`` runs the tasks in the calling process.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import os
import pickle
import re
import resource
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Sequence

RANGE_BYTES = 1 << 22  # a worker holds ~5x the byte range it decodes: 4 MiB ranges keep a worker near 80 MiB
_QUEUED_PER_WORKER = 4  # tasks sent ahead to each worker
_MAX_TASK_BYTES = 4096  # 4 queued tasks stay far below a pipe's 64 KiB: sending one never blocks


def default_workers() -> int:
    """``BEVPERC_EVAL_WORKERS`` if set, else the CPU cores this process may use, at most 2."""
    value = os.environ.get("BEVPERC_EVAL_WORKERS")
    if value is not None:
        try:
            return max(1, int(value))
        except ValueError:
            raise ValueError(f"BEVPERC_EVAL_WORKERS must be an integer, got {value!r}") from None
    return min(2, len(os.sched_getaffinity(0)))


class _Worker:
    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from bevperc.evaluation.workers import serve; serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.peak_mib = 0.0

    def _send(self, message: bytes) -> None:
        self.process.stdin.write(message)
        self.process.stdin.flush()

    def setup(self, function: Callable[[Any, Any], Any], shared: Any) -> None:
        self._send(pickle.dumps(("setup", function.__module__, function.__qualname__, shared), protocol=5))

    def run(self, task: Any) -> None:
        message = pickle.dumps(("run", task), protocol=5)
        if len(message) > _MAX_TASK_BYTES:
            raise ValueError(f"a task must pickle to at most {_MAX_TASK_BYTES} bytes (put big data in 'shared')")
        self._send(message)

    def receive(self) -> Any:
        try:
            ok, value, peak_mib = pickle.load(self.process.stdout)
        except EOFError:
            raise RuntimeError(f"evaluation worker {self.process.pid} exited with code {self.process.wait()} "
                               "(its error is printed above)") from None
        self.peak_mib = max(self.peak_mib, peak_mib)
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


_workers: list[_Worker] = []
_lock = threading.Lock()


def prestart(workers: int) -> None:
    """Start the worker processes now (they boot while this process does other work)."""
    if workers > 1:
        while len(_workers) < workers:
            _workers.append(_Worker())


def shutdown_workers() -> None:
    """Stop the worker processes (a later parallel stage starts new ones)."""
    while _workers:
        _workers.pop().close()


atexit.register(shutdown_workers)


def run_tasks(function: Callable[[Any, Any], Any], shared: Any, tasks: Sequence[Any], workers: int) -> Iterator[Any]:
    """``function(shared, task)`` for each task, yielded in task order. ``function`` must be a
    module-level function and each task small (``shared`` carries the big data, sent once per worker);
    an exception raised in a worker is raised here. A caller that stops early must close the generator
    (``contextlib.closing``): closing it collects the results still in flight."""
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield function(shared, task)
        return
    with _lock:
        prestart(workers)
        pool = _workers[:workers]
        for worker in pool:
            worker.setup(function, shared)
        sent = received = 0
        try:
            while received < len(tasks):
                while sent < min(received + workers * _QUEUED_PER_WORKER, len(tasks)):
                    pool[sent % workers].run(tasks[sent])
                    sent += 1
                received += 1  # before receive(): a result that is an error has been read too
                yield pool[(received - 1) % workers].receive()
        finally:
            _collect(pool, received, sent)


def _collect(pool: list[_Worker], received: int, sent: int) -> None:
    """Read and drop the results of tasks [received, sent); forget workers that have exited."""
    for i in range(received, sent):
        try:
            pool[i % len(pool)].receive()
        except Exception:  # noqa: BLE001 - the caller already stopped on an error
            pass
    _workers[:] = [worker for worker in _workers if worker.process.poll() is None]


def byte_ranges(path: Path, start: int, end: int, boundary: re.Pattern,
                chunk_bytes: int | None = None) -> list[tuple[int, int]]:
    """Split bytes [start, end) of a file into ranges of about ``chunk_bytes`` (default
    :data:`RANGE_BYTES`), in order: each cut is at the first match of ``boundary`` after a multiple of
    ``chunk_bytes`` (a range ends at the match's empty group ``cut``, the next one starts where the
    match ends)."""
    chunk_bytes = chunk_bytes or RANGE_BYTES
    ranges = []
    begin = start
    with open(path, "rb") as handle:
        while end - begin > 2 * chunk_bytes:
            target = begin + chunk_bytes
            found = _first_match(handle, target, end, boundary)
            if found is None:
                break
            ranges.append((begin, target + found.start("cut")))
            begin = target + found.end()
    ranges.append((begin, end))
    return ranges


def _first_match(handle: BinaryIO, start: int, end: int, pattern: re.Pattern) -> re.Match | None:
    """The first match of ``pattern`` in bytes [start, end) of a file (offsets relative to start),
    reading a window that doubles until a match is found."""
    window = 1 << 16
    while True:
        handle.seek(start)
        data = handle.read(min(window, end - start))
        found = pattern.search(data)
        if found is not None and found.end() < len(data) or start + len(data) >= end:
            return found  # a match that ends at the window's edge might continue: read more first
        window *= 2


def worker_peak_mib() -> float:
    """Sum over the worker processes of their peak resident memory (MiB) as of their last task: an
    upper bound of the memory the workers held at any one time."""
    return sum(worker.peak_mib for worker in _workers)


def serve() -> None:
    """The worker loop: run tasks from stdin until it closes."""
    messages, results = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a print in a task must not corrupt the result stream
    function: Callable[[Any], Any] | None = None
    while True:
        try:
            message = pickle.load(messages)
        except EOFError:
            return
        if message[0] == "setup":
            _, module, name, shared = message
            function = functools.partial(getattr(importlib.import_module(module), name), shared)
            continue
        try:
            reply = pickle.dumps((True, function(message[1]), _peak_mib()), protocol=5)
        except Exception as exc:  # noqa: BLE001 - raised again in the calling process
            try:
                reply = pickle.dumps((False, exc, _peak_mib()), protocol=5)
            except Exception:  # noqa: BLE001 - an exception that cannot be pickled
                reply = pickle.dumps((False, RuntimeError(f"{type(exc).__name__}: {exc}"), _peak_mib()), protocol=5)
        results.write(reply)
        results.flush()


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
