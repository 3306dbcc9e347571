"""Loss engine figures: the task-affinity matrix with the found task sets, the second weights and the learnability gates over training.

Input is the JSON-able dict of ``LossEngine.summary()`` (bevperc/losses/engine.py), so a
figure can be drawn from a live engine or from a ``summary.json`` saved with a run.
Task names ``group.branch`` with long class groups are shortened in labels
(``car+truck+bus+trailer+construction_vehicle.size`` -> ``car+4.size``).
Keys used: ``task_names``, ``task_sets``, ``affinity`` ([T][T], None = unknown),
``second_weights``, ``first_weights``, ``task_weights``, ``weight_history``
(``[{"step", "weights", "set_gates"?, "task_gates"?}]``) and ``grouping_history`` (``[{"step", "accepted", "sets", ...}]``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from bevperc.viz.colors import set_colors


def _require(summary: Mapping[str, Any], key: str) -> Any:
    if key not in summary:
        raise KeyError(f"loss engine summary: missing key {key!r} (expected LossEngine.summary() output; has {sorted(summary)})")
    return summary[key]


def short_task_name(name: str, max_group_chars: int = 14) -> str:
    """``car+truck+bus+trailer+construction_vehicle.heatmap`` -> ``car+4.heatmap`` for tick labels."""
    group, dot, branch = name.partition(".")
    members = group.split("+")
    if dot and len(group) > max_group_chars and len(members) > 1:
        group = f"{members[0]}+{len(members) - 1}"
    return f"{group}{dot}{branch}"


def set_order(task_names: Sequence[str], task_sets: Sequence[Sequence[str]]) -> tuple[list[int], list[int]]:
    """Task indices ordered set by set, and the size of each set (for drawing set blocks)."""
    index = {name: i for i, name in enumerate(task_names)}
    order, sizes = [], []
    for task_set in task_sets:
        members = [index[name] for name in task_set if name in index]
        order += members
        sizes.append(len(members))
    missing = [i for i in range(len(task_names)) if i not in order]  # tasks in no set: at the end
    if missing:
        order += missing
        sizes.append(len(missing))
    return order, sizes


def affinity_matrix(summary: Mapping[str, Any]) -> np.ndarray:
    """``(T, T)`` float array of the summary's affinity (NaN where unknown or not yet measured)."""
    names = _require(summary, "task_names")
    raw = summary.get("affinity")
    if raw is None:
        return np.full((len(names), len(names)), np.nan)
    matrix = np.array([[np.nan if v is None else float(v) for v in row] for row in raw], dtype=np.float64)
    if matrix.shape != (len(names), len(names)):
        raise ValueError(f"loss engine summary: affinity has shape {matrix.shape}, expected ({len(names)}, {len(names)})")
    return matrix


def plot_affinity_on_axes(ax: Axes, summary: Mapping[str, Any], annotate: bool | None = None) -> Any:
    """Affinity heatmap, tasks ordered by set, each set's block outlined in its colour. Returns the image."""
    import matplotlib

    names = list(_require(summary, "task_names"))
    sets = list(_require(summary, "task_sets"))
    order, sizes = set_order(names, sets)
    matrix = affinity_matrix(summary)[np.ix_(order, order)]
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.85")
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks(range(len(order)))
    ax.set_yticks(range(len(order)))
    fontsize = 7 if len(order) <= 24 else 5
    ax.set_xticklabels([short_task_name(names[i]) for i in order], rotation=90, fontsize=fontsize)
    ax.set_yticklabels([short_task_name(names[i]) for i in order], fontsize=fontsize)
    colors = set_colors(len(sizes))
    start = 0
    for j, size in enumerate(sizes):
        ax.add_patch(Rectangle((start - 0.5, start - 0.5), size, size, fill=False, edgecolor=colors[j], linewidth=2.5))
        for tick in list(ax.get_xticklabels())[start : start + size] + list(ax.get_yticklabels())[start : start + size]:
            tick.set_color(colors[j])
        start += size
    if annotate if annotate is not None else len(order) <= 12:
        for r in range(len(order)):
            for c in range(len(order)):
                if np.isfinite(matrix[r, c]):
                    ax.text(c, r, f"{matrix[r, c]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if abs(matrix[r, c]) > 0.6 else "black")  # fmt: skip
    measured = "not measured yet (grey)" if not np.isfinite(matrix).any() else "grey = unknown"
    ax.set_title(f"task affinity, {len(sets)} task sets (outlined); {measured}", fontsize=9)
    return image


def weight_segments(summary: Mapping[str, Any], key: str = "weights") -> list[dict[str, Any]]:
    """Split ``weight_history`` (its entries that hold ``key``: ``weights`` or ``set_gates``) into runs
    with one grouping each.

    Returns a list of ``{"steps": (S,), "weights": (S, N), "sets": [[names]...] | None}`` (``weights``:
    the values of ``key``); a new segment starts where the number of sets changes or an accepted
    regrouping happened.
    """
    history = [{"step": entry["step"], "weights": entry[key]}
               for entry in summary.get("weight_history") or [] if key in entry]
    names = list(summary.get("task_names") or [])
    regroups = sorted(
        (event for event in summary.get("grouping_history") or [] if event.get("accepted")), key=lambda e: e["step"]
    )
    regroup_steps = [event["step"] for event in regroups]
    segments: list[dict[str, Any]] = []
    current: list[dict[str, Any]] = []

    def sets_at(step: int, num_sets: int) -> list[list[str]] | None:
        accepted = [event for event in regroups if event["step"] <= step and len(event.get("sets", [])) == num_sets]
        if accepted:
            return accepted[-1]["sets"]
        if num_sets == len(names) and not any(s <= step for s in regroup_steps):
            return [[name] for name in names]  # singletons before the first grouping
        final_sets = summary.get("task_sets")
        return final_sets if final_sets is not None and len(final_sets) == num_sets else None

    def close() -> None:
        if current:
            steps = np.array([entry["step"] for entry in current], dtype=np.float64)
            weights = np.array([entry["weights"] for entry in current], dtype=np.float64)
            segments.append({"steps": steps, "weights": weights, "sets": sets_at(int(steps[0]), weights.shape[1])})

    for entry in history:
        if current:
            previous = current[-1]
            crossed = any(previous["step"] < s <= entry["step"] for s in regroup_steps)
            if len(entry["weights"]) != len(previous["weights"]) or crossed:
                close()
                current = []
        current.append(entry)
    close()
    return segments


def _set_label(j: int, task_set: Sequence[str] | None, max_chars: int = 48) -> str:
    if not task_set:
        return f"set {j}"
    text = ", ".join(short_task_name(name) for name in task_set)
    return f"set {j}: {text if len(text) <= max_chars else text[: max_chars - 3] + '...'}"


def _plot_set_segments(ax: Axes, summary: Mapping[str, Any], segments: list[dict[str, Any]]) -> None:
    """One line per task set over training from ``weight_segments`` (earlier groupings in grey), the
    summary's regroupings dashed."""
    for index, segment in enumerate(segments):
        num_sets = segment["weights"].shape[1]
        colors = set_colors(num_sets)
        is_last = index == len(segments) - 1
        for j in range(num_sets):
            task_set = segment["sets"][j] if segment["sets"] is not None else None
            # Earlier groupings in grey: their set indices mean other sets than the final ones.
            label = _set_label(j, task_set) if is_last else ("earlier grouping" if index == 0 and j == 0 else None)
            ax.plot(
                segment["steps"], segment["weights"][:, j], color=colors[j] if is_last else "0.6",
                linewidth=1.6 if is_last else 0.8, marker="." if len(segment["steps"]) < 30 else None,
                markersize=3, label=label,
            )  # fmt: skip
    for event in summary.get("grouping_history") or []:
        ax.axvline(event["step"], color="k" if event.get("accepted") else "0.7", linestyle="--", linewidth=0.8)
    ax.set_xlabel("training step", fontsize=8)
    ax.tick_params(labelsize=7)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")


def plot_second_weights_on_axes(ax: Axes, summary: Mapping[str, Any]) -> None:
    """Second weight of each task set over training steps (one line per set), regroupings marked."""
    segments = weight_segments(summary)
    if not segments:
        weights = np.asarray(summary.get("second_weights") or [], dtype=np.float64)
        colors = set_colors(max(len(weights), 1))
        for j, weight in enumerate(weights):
            ax.axhline(weight, color=colors[j], label=_set_label(j, (summary.get("task_sets") or [None] * len(weights))[j]))
        ax.set_title("second weights (no history recorded yet: current values)", fontsize=9)
        ax.tick_params(labelsize=7)
        if weights.size:
            ax.legend(fontsize=7, loc="best")
    else:
        _plot_set_segments(ax, summary, segments)
        final_sets = summary.get("task_sets")
        final = len(final_sets) if final_sets is not None else "?"
        ax.set_title(f"second weights per task set (final grouping: {final} sets; dashed: regrouping, grey = kept)", fontsize=9)
    ax.axhline(1.0, color="0.5", linewidth=0.6, linestyle=":")
    ax.set_ylabel("second weight (mean 1)", fontsize=8)


def has_gates(summary: Mapping[str, Any]) -> bool:
    """Whether the summary recorded learnability gates (engines from before they were recorded did not)."""
    return any("set_gates" in e or "task_gates" in e for e in summary.get("weight_history") or [])


def plot_set_gates_on_axes(ax: Axes, summary: Mapping[str, Any]) -> None:
    """Learnability gate of each task set over training (the second weights' lag rule): ~0 = the set's
    loss did not move beyond its noise, so the rule treats it as neither ahead nor behind."""
    segments = weight_segments(summary, "set_gates")
    if not segments:
        ax.set_axis_off()
        ax.set_title("set gates: not recorded (a condition without a learnability gate)", fontsize=9)
        return
    _plot_set_segments(ax, summary, segments)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("gate (0 = flat, 1 = moving)", fontsize=8)
    ax.set_title("learnability gate per task set (second weights)", fontsize=9)


def plot_task_gates_on_axes(ax: Axes, summary: Mapping[str, Any]) -> Any:
    """Learnability gate of each task (the first weights' lag rule) over training: tasks (rows, set by
    set in the final grouping) x condition calls (columns). Returns the image (for a colorbar) or None."""
    entries = [e for e in summary.get("weight_history") or [] if "task_gates" in e]
    names = list(_require(summary, "task_names"))
    if not entries:
        ax.set_axis_off()
        ax.set_title("task gates: not recorded (first weights fixed)", fontsize=9)
        return None
    order, _ = set_order(names, summary.get("task_sets") or [[name] for name in names])
    gates = np.array([e["task_gates"] for e in entries], dtype=np.float64)[:, order].T     # [T, calls]
    steps = [e["step"] for e in entries]
    image = ax.imshow(gates, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest",
                      extent=(steps[0], steps[-1], len(order) - 0.5, -0.5))
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels([short_task_name(names[i]) for i in order], fontsize=6)
    ax.set_xlabel("training step", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title("learnability gate per task (first weights; rows set by set)", fontsize=9)
    return image


def plot_task_weights_on_axes(ax: Axes, summary: Mapping[str, Any]) -> None:
    """Bar chart of each task's effective weight (``task_weights``), coloured by its set."""
    names = list(_require(summary, "task_names"))
    sets = list(_require(summary, "task_sets"))
    weights = summary.get("task_weights") or {}
    order, sizes = set_order(names, sets)
    colors = set_colors(len(sizes))
    bar_colors = [colors[j] for j, size in enumerate(sizes) for _ in range(size)]
    ax.bar(range(len(order)), [weights.get(names[i], np.nan) for i in order], color=bar_colors)
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([short_task_name(names[i]) for i in order], rotation=90, fontsize=6)
    ax.set_yscale("log")
    ax.set_ylabel("effective weight w_set * a_i / s_i", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title("effective weight on each raw task loss", fontsize=9)


def plot_loss_engine(summary: Mapping[str, Any], title: str | None = None, with_task_weights: bool = True) -> Figure:
    """Figure: affinity matrix with set boundaries | second weights over training (| effective task
    weights); below, where the summary recorded them, the learnability gates of the sets and the tasks."""
    panels = 3 if with_task_weights and summary.get("task_weights") else 2
    rows = 2 if has_gates(summary) else 1
    num_tasks = len(_require(summary, "task_names"))
    side = float(np.clip(0.28 * num_tasks + 3.0, 5.0, 11.0))
    fig = Figure(figsize=(side + 7.0 * (panels - 1), side * rows), layout="constrained")
    grid = fig.add_gridspec(rows, panels, width_ratios=[side] + [7.0] * (panels - 1))
    ax_affinity = fig.add_subplot(grid[0, 0])
    image = plot_affinity_on_axes(ax_affinity, summary)
    fig.colorbar(image, ax=ax_affinity, fraction=0.046, pad=0.02, label="affinity")
    plot_second_weights_on_axes(fig.add_subplot(grid[0, 1]), summary)
    if panels == 3:
        plot_task_weights_on_axes(fig.add_subplot(grid[0, 2]), summary)
    if rows == 2:
        plot_set_gates_on_axes(fig.add_subplot(grid[1, 1:] if panels == 3 else grid[1, 1]), summary)
        ax_tasks = fig.add_subplot(grid[1, 0])
        gates = plot_task_gates_on_axes(ax_tasks, summary)
        if gates is not None:
            fig.colorbar(gates, ax=ax_tasks, fraction=0.046, pad=0.02, label="gate")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig
