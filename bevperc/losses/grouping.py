"""Task grouping of the loss engine: when affinity is recorded, how it is measured, and when the
clustering of the tasks into sets replaces the current one (docs/methods.md, part A, step 2).

The affinity mathematics (per-sample loss buffer, correlations, gradient cosines, clustering, silhouette)
lives in :mod:`bevperc.losses.affinity`; this module holds the schedule and the state around it.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from bevperc.losses import affinity as aff
from bevperc.losses.config import LossEngineConfig


def labels_from_sets(sets: list[list[str]], task_names: list[str]) -> np.ndarray:
    """Set index [T] of each task from user-fixed ``sets`` (every task exactly once, no empty set)."""
    flat = [name for task_set in sets for name in task_set]
    if sorted(flat) != sorted(task_names) or len(sets) < 1 or any(len(s) == 0 for s in sets):
        raise ValueError(f"LossEngineConfig.fixed_sets: every task exactly once in non-empty sets; "
                         f"got {sets} for tasks {task_names}")
    index = {name: j for j, task_set in enumerate(sets) for name in task_set}
    return np.array([index[name] for name in task_names])


def sets_of(labels: list[int], task_names: list[str]) -> list[list[str]]:
    """Task sets in set order, each a list of task names in task order, from set indices [T]."""
    return [[n for n, lab in zip(task_names, labels) if lab == j] for j in range(max(labels) + 1)]


def known_sums(cosine: Tensor) -> Tensor:
    """[2, T, T]: the finite entries of gradient cosines [T, T] (0 where unknown) and their count."""
    known = torch.isfinite(cosine)
    return torch.stack([torch.where(known, cosine, torch.zeros_like(cosine)), known.double()])


class TaskGrouping:
    """Affinity recording windows, affinity measurement and regrouping with hysteresis.

    Steps are the engine's iteration counter. With ``grouping='cluster'`` and no ``fixed_sets`` the
    tasks are grouped at ``warmup_steps`` and every ``regroup_every`` steps after; the last
    ``affinity_steps`` steps before each grouping record per-sample losses (``samples``) and, with
    affinity 'grad_cos'/'both', gradient cosines summed into ``grad_sum`` / ``grad_count`` [T, T].
    ``history`` holds one event per grouping (accepted or not).
    """

    def __init__(self, task_names: list[str], cfg: LossEngineConfig):
        self.cfg = cfg
        self.task_names = task_names
        num_tasks = len(task_names)
        self.samples = aff.SampleLossBuffer(num_tasks, cfg.affinity_capacity)
        self.grad_sum = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
        self.grad_count = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
        self.grad_records = 0
        self.last_batch = 0                                    # per-sample rows last recorded (all ranks)
        self.affinity: Tensor | None = None                    # [T, T] last clustered
        self.affinity_total = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)  # affinity_memory 'cumulative':
        self.affinity_windows = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)  # sum and count of the windows
        self.score: float | None = None                        # silhouette of the current grouping
        self.history: list[dict[str, Any]] = []
        self.grouped = not self._clusters()

    def _clusters(self) -> bool:
        return self.cfg.fixed_sets is None and self.cfg.grouping == "cluster"

    def _steps_to_grouping(self, iteration: int) -> int:
        """Steps from ``iteration`` to the next grouping (after the warm-up: needs regroup_every > 0)."""
        if iteration < self.cfg.warmup_steps:
            return self.cfg.warmup_steps - iteration
        return self.cfg.regroup_every - (iteration - self.cfg.warmup_steps) % self.cfg.regroup_every

    def due(self, iteration: int) -> bool:
        """Whether the tasks are (re)grouped once ``iteration`` steps are done."""
        if not self._clusters():
            return False
        if iteration == self.cfg.warmup_steps:
            return True
        return (self.cfg.regroup_every > 0 and iteration > self.cfg.warmup_steps
                and (iteration - self.cfg.warmup_steps) % self.cfg.regroup_every == 0)

    def recording(self, iteration: int) -> bool:
        """Whether this step's per-sample losses/gradients feed the next grouping."""
        if not self._clusters():
            return False
        if iteration < self.cfg.warmup_steps:
            return iteration >= self.cfg.warmup_steps - self.cfg.affinity_steps
        if self.cfg.regroup_every == 0:
            return False
        return self._steps_to_grouping(iteration) <= self.cfg.affinity_steps

    def _samples_survive(self, iteration: int) -> bool:
        """Whether this step's per-sample losses will still be in the buffer at the next grouping.

        The buffer keeps the newest ``affinity_capacity`` samples, so with batch B only the last
        ``capacity // B`` recorded steps count; stacking and copying earlier ones is wasted time
        (a large share of the engine's cost on small models). B is the last recorded batch size.
        """
        if self.last_batch == 0:
            return True
        return self._steps_to_grouping(iteration) * self.last_batch <= self.cfg.affinity_capacity

    def observe(self, iteration: int, losses: Mapping[str, Tensor], per_sample: Mapping[str, Tensor] | None,
                shared_features: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """This step's affinity data in a recording window: per-sample losses [B, T] and gradient
        cosines [T, T] on ``shared_features`` (each None when not recorded)."""
        samples = cosine = None
        if self.recording(iteration):
            if per_sample and self._samples_survive(iteration):
                samples = self._stack_per_sample(per_sample)
            if (self.cfg.affinity != "loss_corr" and shared_features is not None
                    and self.grad_records % self.cfg.grad_affinity_every == 0):
                cosine = aff.gradient_cosine([losses[n] for n in self.task_names], shared_features).double()
        return samples, cosine

    def _stack_per_sample(self, per_sample: Mapping[str, Tensor]) -> Tensor | None:
        """[B, T] per-sample losses (NaN for tasks not given); B from the first vector given."""
        if len(per_sample) == len(self.task_names):
            try:  # common case: every task gave a [B] vector
                return torch.stack([per_sample[n].reshape(-1) for n in self.task_names], 1).detach().float().cpu()
            except (RuntimeError, KeyError):
                pass  # unequal lengths or other names: the checked path below explains
        batch = None
        columns = []
        for name in self.task_names:
            vector = per_sample.get(name)
            if vector is not None:
                vector = vector.detach().reshape(-1).float()
                batch = vector.numel() if batch is None else batch
                if vector.numel() != batch:
                    raise ValueError(f"LossEngine: per_sample[{name!r}] has {vector.numel()} entries, "
                                     f"expected {batch} like the other tasks (one per sample)")
            columns.append(vector)
        if batch is None or batch < 2:
            return None
        nan = torch.full((batch,), float("nan"))
        return torch.stack([c.cpu() if c is not None else nan for c in columns], 1)

    def add(self, iteration: int, samples: Tensor | None, cosine_sums: Tensor | None) -> None:
        """File a step's (all-rank) per-sample losses [B, T] and :func:`known_sums` of its cosines [2, T, T]."""
        if samples is not None:
            self.samples.add(samples)
            self.last_batch = int(samples.shape[0])
        if cosine_sums is not None:
            self.grad_sum += cosine_sums[0]
            self.grad_count += cosine_sums[1]
        if self.cfg.affinity != "loss_corr" and self.recording(iteration):
            self.grad_records += 1

    def measure_affinity(self, ordered_history: Tensor) -> Tensor:
        """Task affinity [T, T] in [-1, 1] from the recorded statistics (NaN = unknown).

        Falls back to the correlation of step-to-step changes of the log task losses
        (``ordered_history`` [H, T], NaN = not observed) when no per-sample losses or gradients
        were recorded.
        """
        matrices = []
        if self.cfg.affinity in ("loss_corr", "both") and self.samples.filled >= 8:
            matrices.append(self.samples.correlation())
        if self.cfg.affinity in ("grad_cos", "both") and float(self.grad_count.max()) > 0:
            mean = self.grad_sum / self.grad_count.clamp(min=1)
            mean[self.grad_count == 0] = float("nan")
            matrices.append(mean.float())
        if not matrices:
            log_history = ordered_history.cpu().clamp(min=1e-30).log()
            matrices.append(aff.pairwise_correlation(log_history[1:] - log_history[:-1], min_pairs=4))
        stacked = torch.stack(matrices)
        known = torch.isfinite(stacked)
        count = known.sum(0)
        mean = torch.where(known, stacked, torch.zeros_like(stacked)).sum(0) / count.clamp(min=1)
        return torch.where(count > 0, mean, torch.full_like(mean, float("nan")))

    def regroup(self, iteration: int, labels: np.ndarray, ordered_history: Tensor) -> np.ndarray | None:
        """Measure, cluster, and return the new set labels [T], or None to keep ``labels`` [T].

        Hysteresis: once grouped, a new grouping replaces the current one only if it differs and its
        silhouette on the new affinity beats the current grouping's by ``regroup_margin``; its set
        indices are then aligned with the current ones. Records the event and restarts recording.
        """
        cfg = self.cfg
        self.affinity = self._remembered(self.measure_affinity(ordered_history))  # the same on every rank
        new, score = aff.cluster_tasks(self.affinity, cfg.num_sets, cfg.min_sets, cfg.max_sets, cfg.clustering)
        event = {"step": iteration, "score": float(score), "accepted": False}
        self._reset_recording()
        if self.grouped:
            current_score = aff.grouping_score(aff.affinity_to_distance(self.affinity), labels)
            same = np.array_equal(aff.canonical_labels(new), aff.canonical_labels(labels))
            if same or score < current_score + cfg.regroup_margin:
                self.score = current_score
                event.update(current_score=float(current_score))
                self.history.append(event)
                return None
            new = aff.align_labels(new, labels)
        else:
            new = aff.canonical_labels(new)
        self.grouped = True
        self.score = float(score)
        event.update(accepted=True, sets=sets_of(new.tolist(), self.task_names))
        self.history.append(event)
        return new

    def _remembered(self, window: Tensor) -> Tensor:
        """The affinity [T, T] to cluster from this window's ``window`` [T, T] (NaN = unknown): the window's own with
        ``affinity_memory='window'``, else the mean over every window so far (each known entry counted once per window)."""
        if self.cfg.affinity_memory == "window":
            return window
        known = torch.isfinite(window).cpu()
        self.affinity_total += torch.where(known, window.cpu().double(), torch.zeros_like(self.affinity_total))
        self.affinity_windows += known.double()
        mean = self.affinity_total / self.affinity_windows.clamp(min=1)
        return torch.where(self.affinity_windows > 0, mean, torch.full_like(mean, float("nan"))).to(window)

    def _reset_recording(self) -> None:
        """Start the next affinity measurement from fresh samples/gradients."""
        self.samples = aff.SampleLossBuffer(len(self.task_names), self.cfg.affinity_capacity)
        self.grad_sum.zero_()
        self.grad_count.zero_()
        self.grad_records = 0

    def state_dict(self) -> dict[str, Any]:
        """The grouping state (checkpoint keys of the engine's extra state)."""
        return {
            "grouped": self.grouped,
            "samples": self.samples.state_dict(),
            "grad_affinity_sum": self.grad_sum.clone(),
            "grad_affinity_count": self.grad_count.clone(),
            "grad_records": self.grad_records,
            "last_batch": self.last_batch,
            "affinity": None if self.affinity is None else self.affinity.clone(),
            "grouping_score": self.score,
            "grouping_history": [dict(e) for e in self.history],
            "affinity_total": self.affinity_total.clone(),
            "affinity_windows": self.affinity_windows.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.grouped = bool(state["grouped"])
        self.samples.load_state_dict(state["samples"])
        self.grad_sum = state["grad_affinity_sum"].clone()
        self.grad_count = state["grad_affinity_count"].clone()
        self.grad_records = int(state["grad_records"])
        self.last_batch = int(state.get("last_batch", 0))
        self.affinity = None if state["affinity"] is None else state["affinity"].clone()
        self.score = state["grouping_score"]
        self.history = [dict(e) for e in state["grouping_history"]]
        if "affinity_total" in state:  # checkpoints written before affinity_memory have none (all windows: 'window')
            self.affinity_total = state["affinity_total"].clone()
            self.affinity_windows = state["affinity_windows"].clone()
