"""Training curves of a run: loss per step, learning rate, in-training validation metrics.

Input: the ``history`` dict :class:`bevperc.training.Trainer` keeps (``Trainer.history``, returned by
``fit()``) or the one stored in its checkpoints (``state["history"]``, loss/lr as float64 tensors)::

    {"loss": [per step], "lr": [per step], "grad_norm": [per step], "skipped_steps": [global steps],
     "val": [{"epoch": e, "step": s, "train_seconds": t, "mAP": .., "NDS": .., ...}, ...]}

``loss[i]`` belongs to global step ``i + 1``. A validation entry is drawn at its ``step`` (the global step
of the validated weights); entries of older checkpoints without ``step`` are placed at
``(epoch + 1) * steps_per_epoch``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

VAL_METRIC_ORDER = ("mAP", "NDS")  # drawn first, in this order; any other numeric metric follows, sorted
VAL_WHEN = ("epoch", "step", "train_seconds")  # when a validation entry was taken: not metrics
VAL_COLORS = {"mAP": "tab:blue", "NDS": "tab:orange"}


def history_from_checkpoint(state: Mapping[str, Any]) -> dict[str, Any] | None:
    """The training history of a loaded checkpoint as plain lists, plus ``steps_per_epoch``.

    None when the checkpoint holds no history or no training step (e.g. a bare ``{"model": ...}``).
    """
    history = state.get("history")
    if not isinstance(history, Mapping) or "loss" not in history:
        return None
    plain: dict[str, Any] = {key: _as_list(history.get(key, [])) for key in ("loss", "lr", "grad_norm", "skipped_steps")}
    if not plain["loss"]:
        return None
    plain["val"] = [dict(entry) for entry in history.get("val", [])]
    data = state.get("data") or {}
    if data.get("iters_per_epoch"):
        plain["steps_per_epoch"] = int(data["iters_per_epoch"])
    return plain


def moving_average(values: Sequence[float] | np.ndarray, window: int, center: bool = True) -> np.ndarray:
    """Mean of the finite values (NaN/inf, i.e. skipped steps, ignored) in a ``window`` around each step.

    ``center=True``: the window is centred on the step (no lag; shorter at both ends);
    ``center=False``: the trailing ``window`` steps (what a running log shows).
    """
    values = np.asarray(values, dtype=np.float64)
    window = max(1, int(window))
    finite = np.isfinite(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    end = np.minimum(np.arange(1, len(values) + 1) + (window // 2 if center else 0), len(values))
    start = np.maximum(np.arange(1, len(values) + 1) + (window // 2 if center else 0) - window, 0)
    n = counts[end] - counts[start]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (sums[end] - sums[start]) / np.maximum(n, 1), np.nan)


def validation_points(history: Mapping[str, Any], steps_per_epoch: int | None = None
                      ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], bool]:
    """``{metric: (steps, values)}`` of the validation entries, and whether the steps were estimated.

    The step of an entry is its ``step``; else ``(epoch + 1) * steps_per_epoch`` (argument, or
    ``history["steps_per_epoch"]``); else, last resort, steps per epoch estimated as
    ``len(loss) / (last validated epoch + 1)`` (exact when the run ended with a validation).
    """
    entries = [entry for entry in history.get("val", []) if isinstance(entry, Mapping)]
    steps_per_epoch = steps_per_epoch or history.get("steps_per_epoch")
    estimated = False
    if entries and not steps_per_epoch and any("step" not in entry for entry in entries):
        last_epoch = max(int(entry.get("epoch", 0)) for entry in entries)
        steps_per_epoch = len(history.get("loss", [])) / (last_epoch + 1)
        estimated = True
    names = [name for name in VAL_METRIC_ORDER if any(name in entry for entry in entries)]
    names += sorted({name for entry in entries for name, value in entry.items()
                     if name not in VAL_WHEN and name not in names and _is_number(value)})
    points: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in names:
        xs, ys = [], []
        for entry in entries:
            if not _is_number(entry.get(name)):
                continue
            step = entry["step"] if "step" in entry else (int(entry.get("epoch", 0)) + 1) * steps_per_epoch
            xs.append(float(step))
            ys.append(float(entry[name]))
        order = np.argsort(xs, kind="stable")
        points[name] = (np.asarray(xs)[order], np.asarray(ys)[order])
    return points, estimated


def plot_training_curves(history: Mapping[str, Any], steps_per_epoch: int | None = None, title: str | None = None,
                         smoothing: int | None = None) -> Figure:
    """Figure: training loss per step (raw + moving average) | learning rate | validation metrics vs step.

    The data lines carry a ``gid``: ``loss``, ``loss_average``, ``skipped_steps``, ``lr``, ``val/<metric>``.

    ``steps_per_epoch`` (default ``history["steps_per_epoch"]``, set by :func:`history_from_checkpoint`)
    draws epoch boundaries and places validation entries that carry no ``step``. ``smoothing``: the
    moving-average window in steps (default: about 1/20 of the run, 1-50).
    """
    loss = np.asarray(history.get("loss", []), dtype=np.float64).reshape(-1)
    steps_per_epoch = steps_per_epoch or history.get("steps_per_epoch")
    fig = Figure(figsize=(15, 4.4), layout="constrained")
    ax_loss, ax_lr, ax_val = fig.subplots(1, 3, width_ratios=[1.5, 1.0, 1.2])
    _plot_loss_panel(ax_loss, loss, history.get("skipped_steps", []), smoothing)
    _plot_lr_panel(ax_lr, np.asarray(history.get("lr", []), dtype=np.float64).reshape(-1))
    _plot_validation_panel(ax_val, history, steps_per_epoch)
    if len(loss):
        ax_val.set_xlim(ax_loss.get_xlim())  # same steps as the loss panel
    if steps_per_epoch and len(loss):
        for ax in (ax_loss, ax_lr, ax_val):
            for boundary in np.arange(steps_per_epoch, len(loss) + 1, steps_per_epoch):
                ax.axvline(boundary, color="0.6", linewidth=0.6, linestyle=":", zorder=0)
    for ax in (ax_loss, ax_lr, ax_val):
        ax.grid(alpha=0.25)
        ax.tick_params(labelsize=8)
    summary = f"{len(loss)} steps" + (f", {len(loss) / steps_per_epoch:g} epochs of {steps_per_epoch} steps"
                                      f" (dotted: epoch ends)" if steps_per_epoch and len(loss) else "")
    fig.suptitle(f"{title}: {summary}" if title else f"training curves: {summary}", fontsize=11)
    return fig


def _plot_loss_panel(ax: Axes, loss: np.ndarray, skipped_steps: Any, smoothing: int | None) -> None:
    """Loss per step [S] (step i + 1 at index i), its moving average and the skipped steps."""
    finite = np.isfinite(loss)
    if len(loss):
        steps = np.arange(1, len(loss) + 1)
        window = smoothing or int(np.clip(len(loss) // 20, 1, 50))
        ax.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss per step", gid="loss")
        if window > 1:
            ax.plot(steps, moving_average(loss, window), color="tab:blue", linewidth=1.8,
                    label=f"moving average ({window} steps)", gid="loss_average")
        if finite.any() and (loss[finite] > 0).all() and loss[finite].max() / loss[finite].min() > 10:
            ax.set_yscale("log")
        skipped = np.asarray(skipped_steps, dtype=np.float64).reshape(-1)
        if len(skipped):
            ax.plot(skipped, np.full(len(skipped), 0.02), "|", color="tab:red", markersize=10,
                    transform=ax.get_xaxis_transform(), label=f"skipped step ({len(skipped)})", gid="skipped_steps")
        last = loss[finite][-window:].mean() if finite.any() else float("nan")
        ax.set_title(f"training loss ({len(loss)} steps; last {min(window, int(finite.sum()))}: {last:.4g})",
                     fontsize=10)
        ax.legend(fontsize=8, loc="upper right")
    else:
        ax.set_title("training loss", fontsize=10)
        _note(ax, "no training step recorded")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (total, weighted)")


def _plot_lr_panel(ax: Axes, lr: np.ndarray) -> None:
    """Learning rate per step [S]."""
    if len(lr):
        ax.plot(np.arange(1, len(lr) + 1), lr, color="tab:green", linewidth=1.5, gid="lr")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.set_ylim(bottom=0)
        ax.set_title(f"learning rate (peak {np.nanmax(lr):.3g})", fontsize=10)
    else:
        ax.set_title("learning rate", fontsize=10)
        _note(ax, "no learning rate recorded")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")


def _plot_validation_panel(ax: Axes, history: Mapping[str, Any], steps_per_epoch: int | None) -> None:
    """Validation metrics at their steps (:func:`validation_points`), values written beside few points."""
    points, estimated = validation_points(history, steps_per_epoch)
    if points:
        upper = 0.0
        for name, (xs, ys) in points.items():
            ax.plot(xs, ys, "o-", color=VAL_COLORS.get(name), linewidth=1.5, markersize=5,
                    label=f"{name} (last {ys[-1]:.4g})", gid=f"val/{name}")
            upper = max(upper, float(np.nanmax(ys)) if len(ys) else 0.0)
            if len(xs) <= 12:
                for x, y in zip(xs, ys):
                    ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center",
                                fontsize=7, color=VAL_COLORS.get(name, "0.3"))
        if all((ys >= 0).all() for _, ys in points.values()):
            ax.set_ylim(0, max(upper * 1.25, 1e-3))
        ax.legend(fontsize=8, loc="upper left")
        ax.set_title("validation after epochs" + (" (steps estimated)" if estimated else ""), fontsize=10)
    else:
        ax.set_title("validation after epochs", fontsize=10)
        _note(ax, "no in-training validation\n(train.val_every: 0, or no validate callback)")
    ax.set_xlabel("step")
    ax.set_ylabel("metric")


def _note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.4")


def _as_list(values: Any) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
