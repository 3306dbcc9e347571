"""Per-stage wall and CPU time of an evaluation (what the bench reports stage by stage)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


class StageTimer:
    """Seconds per named stage, in the order the stages first ran (a stage may run several times).

    ``wall_s`` and ``cpu_s`` are measured in this process; ``task_cpu_s`` is CPU time that worker
    processes report for the parts of a stage they ran (see :mod:`bevperc.evaluation.workers`).
    """

    def __init__(self) -> None:
        self._stages: dict[str, dict[str, float]] = {}

    def _entry(self, name: str) -> dict[str, float]:
        return self._stages.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0, "task_cpu_s": 0.0})

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            entry = self._entry(name)
            entry["wall_s"] += time.perf_counter() - wall
            entry["cpu_s"] += time.process_time() - cpu

    def add_task_cpu(self, name: str, seconds: float) -> None:
        self._entry(name)["task_cpu_s"] += seconds

    def merge(self, other: "StageTimer") -> None:
        for name, entry in other._stages.items():
            mine = self._entry(name)
            for key, value in entry.items():
                mine[key] += value

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {name: dict(entry) for name, entry in self._stages.items()}
