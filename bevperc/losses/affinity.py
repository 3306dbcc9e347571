"""Task affinity measurement and clustering of tasks into task sets (docs/methods.md, part A, step 2).

Two affinity measures, both in [-1, 1] (1 = the tasks move together / help each other):

* per-sample loss correlation: Pearson correlation between tasks of their per-sample
  losses, each task's per-sample vector standardised *within its step* first, so the
  common downward trend of all losses over training and changing loss scales do not
  create spurious correlation; only "which samples are hard for which tasks" counts.
* gradient cosine similarity on the shared features (optional; one backward per task
  through the heads only, on measurement steps only).

Tasks are clustered with scikit-learn on the precomputed distance ``(1 - A) / 2``:
agglomerative (average linkage) or spectral (on the affinity ``max(A, 0)``). The number
of sets is fixed or chosen by the silhouette score on the precomputed distance.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import scipy.cluster.hierarchy  # noqa: F401  sklearn imports it at the first fit: ~65 ms inside the training loop
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import AgglomerativeClustering, SpectralClustering
from torch import Tensor


class SampleLossBuffer:
    """Ring buffer of within-step standardised per-sample losses, [capacity, num_tasks].

    Each row is one sample; a task missing for a sample (no vector given that step, or
    a non-finite value) is NaN. Correlations are pairwise-complete.

    ``add`` only keeps a reference to the step's [B, T] losses; standardising and writing them
    into the ring happens in bulk when the rows are read (``correlation``, ``state_dict``):
    one vectorised pass over all pending steps instead of ~10 small tensor ops per training
    step, which on a small model was most of the engine's per-step cost.
    """

    def __init__(self, num_tasks: int, capacity: int):
        self.num_tasks = num_tasks
        self.capacity = int(capacity)
        self.rows = torch.full((self.capacity, num_tasks), float("nan"))
        self.write_pos = 0
        self.filled = 0
        self._pending: list[Tensor] = []   # [B, T] per step, not yet standardised
        self._pending_rows = 0

    def add(self, per_sample: Tensor) -> None:
        """Append per-sample losses [B, num_tasks] (NaN = missing), standardised per column."""
        if per_sample.dim() != 2 or per_sample.shape[1] != self.num_tasks:
            raise ValueError(f"SampleLossBuffer.add: expected per-sample losses [B, {self.num_tasks}], "
                             f"got {tuple(per_sample.shape)}")
        self._pending.append(per_sample.detach())
        self._pending_rows += per_sample.shape[0]
        self.filled = min(self.capacity, self.filled + per_sample.shape[0])
        # steps that the ring would overwrite anyway are dropped (bounded memory)
        while self._pending_rows - self._pending[0].shape[0] >= self.capacity:
            self._pending_rows -= self._pending.pop(0).shape[0]

    def _flush(self) -> None:
        """Standardise the pending steps and write them into the ring."""
        if not self._pending:
            return
        pending, self._pending, self._pending_rows = self._pending, [], 0
        sizes = {p.shape[0] for p in pending}
        if len(sizes) == 1:   # usual case, one batch size: standardise every step in one pass
            batches = torch.stack(pending).to(self.rows.device, torch.float32)      # [K, B, T]
            standardised = standardise_columns(batches).reshape(-1, self.num_tasks)
        else:
            standardised = torch.cat([standardise_columns(p.to(self.rows.device, torch.float32)) for p in pending])
        standardised = standardised[-self.capacity:]
        count = standardised.shape[0]
        index = (torch.arange(count) + self.write_pos) % self.capacity
        self.rows[index] = standardised
        self.write_pos = (self.write_pos + count) % self.capacity

    def correlation(self, min_pairs: int = 8) -> Tensor:
        """Pairwise-complete Pearson correlation [T, T]; NaN where fewer than ``min_pairs`` pairs."""
        self._flush()
        return pairwise_correlation(self.rows[: self.filled], min_pairs)

    def state_dict(self) -> dict:
        self._flush()
        return {"rows": self.rows.clone(), "write_pos": self.write_pos, "filled": self.filled}

    def load_state_dict(self, state: dict) -> None:
        self.rows = state["rows"].clone()
        self.write_pos = int(state["write_pos"])
        self.filled = int(state["filled"])
        self._pending, self._pending_rows = [], 0


def standardise_columns(values: Tensor) -> Tensor:
    """Z-score each column of ``values`` [..., B, T] over its B finite entries (NaN stays NaN).

    Leading dimensions are independent batches. Columns with fewer than 2 finite entries or
    zero spread become all NaN (no information).
    """
    if values.shape[-2] >= 2 and bool(torch.isfinite(values).all()):
        # fast path: no missing values
        std = values.std(-2, unbiased=False, keepdim=True)
        usable = std > 0
        scaled = (values - values.mean(-2, keepdim=True)) / torch.where(usable, std, torch.ones_like(std))
        return torch.where(usable, scaled, torch.full_like(values, float("nan")))
    finite = torch.isfinite(values)
    count = finite.sum(-2, keepdim=True)
    zeros = torch.zeros_like(values)
    mean = torch.where(finite, values, zeros).sum(-2, keepdim=True) / count.clamp(min=1)
    centred = torch.where(finite, values - mean, zeros)
    std = (centred.square().sum(-2, keepdim=True) / count.clamp(min=1)).sqrt()
    usable = (count >= 2) & (std > 0)
    scaled = centred / torch.where(usable, std, torch.ones_like(std))
    return torch.where(finite & usable, scaled, torch.full_like(values, float("nan")))


def pairwise_correlation(rows: Tensor, min_pairs: int = 8) -> Tensor:
    """Pearson correlation [T, T] of the columns of ``rows`` [S, T] over rows where both are finite."""
    finite = torch.isfinite(rows).double()
    values = torch.nan_to_num(rows.double(), nan=0.0, posinf=0.0, neginf=0.0)
    pairs = finite.T @ finite                                   # [T, T] number of common rows
    sum_x = values.T @ finite                                   # sum of x_i over rows where j finite
    sum_xx = (values * values).T @ finite
    sum_xy = values.T @ values
    n = pairs.clamp(min=1)
    cov = sum_xy / n - (sum_x / n) * (sum_x.T / n)
    var_i = (sum_xx / n - (sum_x / n) ** 2).clamp(min=0)
    var_j = var_i.T
    corr = cov / (var_i * var_j).sqrt().clamp(min=1e-12)
    corr = corr.clamp(-1.0, 1.0)
    corr[pairs < min_pairs] = float("nan")
    corr.fill_diagonal_(1.0)
    return corr.float()


def gradient_cosine(task_losses: list[Tensor], shared_features: Tensor) -> Tensor:
    """Cosine similarity [T, T] of the task gradients w.r.t. ``shared_features`` (any shape).

    One ``autograd.grad`` per task (graph retained); backward only through the heads.
    Tasks whose loss is non-finite or has no gradient get a zero row (NaN similarity).
    """
    grads = []
    for loss in task_losses:
        if not (loss.requires_grad and bool(torch.isfinite(loss.detach()))):
            grads.append(None)
            continue
        (grad,) = torch.autograd.grad(loss, shared_features, retain_graph=True, allow_unused=True)
        grads.append(None if grad is None else grad.detach().flatten().float())
    size = shared_features.numel()
    stacked = torch.stack([g if g is not None else torch.zeros(size, device=shared_features.device) for g in grads])
    norms = stacked.norm(dim=1)
    cosine = (stacked @ stacked.T) / (norms[:, None] * norms[None, :]).clamp(min=1e-30)
    missing = norms == 0
    cosine[missing] = float("nan")
    cosine[:, missing] = float("nan")
    cosine.fill_diagonal_(1.0)
    return cosine.clamp(-1.0, 1.0).cpu()


def affinity_to_distance(affinity: Tensor) -> np.ndarray:
    """Distance [T, T] in [0, 1] from affinity in [-1, 1]; unknown (NaN) pairs count as unrelated (0.5)."""
    filled = torch.nan_to_num(affinity.double(), nan=0.0).clamp(-1.0, 1.0)
    distance = ((1.0 - filled) / 2.0).numpy()
    distance = (distance + distance.T) / 2.0
    np.fill_diagonal(distance, 0.0)
    return distance


def grouping_score(distance: np.ndarray, labels: np.ndarray) -> float:
    """Silhouette score of ``labels`` on the precomputed ``distance``; -1 where undefined.

    The same formula as ``sklearn.metrics.silhouette_score(metric="precomputed")`` (tested
    equal), written out for the few tasks here: sklearn's input validation alone costs
    milliseconds per call, and a regrouping scores several candidate N.
    """
    labels = np.asarray(labels)
    ids, index = np.unique(labels, return_inverse=True)
    if not 2 <= len(ids) <= len(labels) - 1:
        return -1.0
    onehot = np.zeros((len(labels), len(ids)))
    onehot[np.arange(len(labels)), index] = 1.0
    sizes = onehot.sum(0)
    totals = np.asarray(distance, dtype=np.float64) @ onehot                # [T, K] summed distance to each set
    own = sizes[index]
    intra = totals[np.arange(len(labels)), index] / np.maximum(own - 1, 1)  # mean distance to the other members
    mean_to = totals / sizes
    mean_to[np.arange(len(labels)), index] = np.inf
    nearest = mean_to.min(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        sample = (nearest - intra) / np.maximum(intra, nearest)
    sample = np.where(own > 1, np.nan_to_num(sample), 0.0)                  # singletons score 0, as in sklearn
    return float(sample.mean())


def cluster_with(distance: np.ndarray, num_sets: int, method: str, seed: int = 0) -> np.ndarray:
    """Labels [T] for ``num_sets`` clusters of the precomputed ``distance`` [T, T]."""
    num_tasks = distance.shape[0]
    if num_sets >= num_tasks:
        return np.arange(num_tasks)
    if method == "agglomerative":
        model = AgglomerativeClustering(n_clusters=num_sets, metric="precomputed", linkage="average")
        return model.fit_predict(distance)
    if method == "spectral":
        affinity = np.clip(1.0 - 2.0 * distance, 0.0, 1.0) + 1e-6
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "graph is not fully connected" is expected for clean groups
            model = SpectralClustering(n_clusters=num_sets, affinity="precomputed", random_state=seed,
                                       assign_labels="discretize")
            return model.fit_predict(affinity)
    raise ValueError(f"LossEngineConfig.clustering: expected 'agglomerative' or 'spectral', got {method!r}")


def cluster_tasks(
    affinity: Tensor, num_sets: int, min_sets: int, max_sets: int, method: str
) -> tuple[np.ndarray, float]:
    """Cluster tasks into sets from ``affinity`` [T, T]; returns (labels [T], silhouette score).

    ``num_sets > 0`` fixes N; ``num_sets == 0`` picks N in [min_sets, max_sets] (clipped to
    [2, T - 1]) with the best silhouette score on the precomputed distance.
    """
    distance = affinity_to_distance(affinity)
    num_tasks = distance.shape[0]
    if num_tasks <= 2:
        labels = np.arange(num_tasks)
        return labels, -1.0
    if num_sets > 0:
        labels = cluster_with(distance, min(num_sets, num_tasks), method)
        return labels, grouping_score(distance, labels)
    candidates = range(max(2, min_sets), min(max_sets, num_tasks - 1) + 1)
    if method == "agglomerative":
        # One fit of the full tree, cut at every candidate N (what sklearn does per N, once).
        children = AgglomerativeClustering(n_clusters=None, distance_threshold=0.0, compute_full_tree=True,
                                           metric="precomputed", linkage="average").fit(distance).children_
        labelings = {n: cut_tree(children, num_tasks, n) for n in candidates}
    else:
        labelings = {n: cluster_with(distance, n, method) for n in candidates}
    best_labels, best_score = None, -np.inf
    for candidate in candidates:
        labels = labelings[candidate]
        score = grouping_score(distance, labels)
        if score > best_score + 1e-9:
            best_labels, best_score = labels, score
    if best_labels is None:
        best_labels = cluster_with(distance, 2, method)
        best_score = grouping_score(distance, best_labels)
    return best_labels, best_score


def cut_tree(children: np.ndarray, num_leaves: int, num_clusters: int) -> np.ndarray:
    """Labels [num_leaves] after the first ``num_leaves - num_clusters`` merges of a sklearn
    ``children_`` array [num_leaves - 1, 2] (merge i creates node ``num_leaves + i``)."""
    parent = list(range(2 * num_leaves - 1))

    def root(node: int) -> int:
        while parent[node] != node:
            node = parent[node]
        return node

    for merge, (left, right) in enumerate(children[: num_leaves - num_clusters]):
        parent[root(int(left))] = num_leaves + merge
        parent[root(int(right))] = num_leaves + merge
    return canonical_labels(np.array([root(leaf) for leaf in range(num_leaves)]))


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Relabel so sets are numbered in order of their first task (a canonical partition id)."""
    mapping: dict[int, int] = {}
    for label in labels.tolist():
        mapping.setdefault(label, len(mapping))
    return np.array([mapping[label] for label in labels.tolist()])


def align_labels(new_labels: np.ndarray, old_labels: np.ndarray) -> np.ndarray:
    """Renumber ``new_labels`` to best match ``old_labels`` (Hungarian matching on overlaps).

    Matched sets keep the old set index; unmatched new sets get fresh indices after them,
    and the result is compacted to 0..N-1 keeping that order.
    """
    new_ids = sorted(set(new_labels.tolist()))
    old_ids = sorted(set(old_labels.tolist()))
    overlap = np.zeros((len(new_ids), len(old_ids)))
    for a, b in zip(new_labels.tolist(), old_labels.tolist()):
        overlap[new_ids.index(a), old_ids.index(b)] += 1
    rows, cols = linear_sum_assignment(-overlap)
    mapping = {new_ids[r]: old_ids[c] for r, c in zip(rows, cols)}
    next_id = max(old_ids) + 1
    for new_id in new_ids:
        if new_id not in mapping:
            mapping[new_id] = next_id
            next_id += 1
    relabelled = np.array([mapping[label] for label in new_labels.tolist()])
    order = {label: rank for rank, label in enumerate(sorted(set(relabelled.tolist())))}
    return np.array([order[label] for label in relabelled.tolist()])
