"""Per-class detection metrics plots from a nuScenes metrics summary (devkit ``metrics_summary.json`` layout).

Keys used: ``mean_dist_aps`` ({class: AP averaged over the 4 distance thresholds}),
``label_aps`` ({class: {threshold: AP}}), ``label_tp_errors`` ({class: {metric: error}}),
``mean_ap`` and ``nd_score``. Both bevperc evaluators (fast and devkit) write it.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from matplotlib.figure import Figure

from bevperc.viz.colors import class_color

TP_METRICS = ("trans_err", "scale_err", "orient_err", "vel_err", "attr_err")
TP_LABELS = {"trans_err": "ATE (m)", "scale_err": "ASE (1-IoU)", "orient_err": "AOE (rad)", "vel_err": "AVE (m/s)",
             "attr_err": "AAE (1-acc)"}  # fmt: skip


def plot_per_class_metrics(summary: Mapping[str, Any], title: str | None = None) -> Figure:
    """Figure: AP per class and distance threshold | TP errors per class (NaN = no true positive)."""
    for key in ("mean_dist_aps", "label_tp_errors"):
        if key not in summary:
            raise KeyError(f"metrics summary: missing {key!r} (expected a nuScenes metrics_summary.json dict)")
    classes = list(summary["mean_dist_aps"])
    fig = Figure(figsize=(15, 4.8), layout="constrained")
    ax_ap, ax_tp = fig.subplots(1, 2, width_ratios=[1.0, 1.4])
    x = np.arange(len(classes))
    label_aps = summary.get("label_aps", {})
    thresholds = sorted({float(t) for aps in label_aps.values() for t in aps}) if label_aps else []
    width = 0.8 / max(len(thresholds), 1)
    for i, threshold in enumerate(thresholds):
        values = [float(_lookup(label_aps[c], threshold)) for c in classes]
        ax_ap.bar(x - 0.4 + (i + 0.5) * width, values, width, color=[class_color(c) for c in classes],
                  alpha=0.35 + 0.65 * (i + 1) / len(thresholds), label=f"{threshold:g} m")  # fmt: skip
    ax_ap.scatter(x, [summary["mean_dist_aps"][c] for c in classes], color="k", marker="_", s=300, zorder=5,
                  label="mean (AP)")  # fmt: skip
    ax_ap.set_xticks(x)
    ax_ap.set_xticklabels(classes, rotation=45, ha="right", fontsize=8)
    ax_ap.set_ylim(0, max(1e-3, max([summary["mean_dist_aps"][c] for c in classes] + [0.05])) * 1.15)
    ax_ap.set_ylabel("AP")
    ax_ap.legend(fontsize=7, title="match distance", title_fontsize=7)
    ax_ap.set_title(f"AP per class (mAP {summary.get('mean_ap', float('nan')):.3f}, NDS {summary.get('nd_score', float('nan')):.3f})", fontsize=9)

    errors = np.array([[float(summary["label_tp_errors"][c].get(m, np.nan)) for m in TP_METRICS] for c in classes])
    width = 0.8 / len(TP_METRICS)
    for j, metric in enumerate(TP_METRICS):
        ax_tp.bar(x - 0.4 + (j + 0.5) * width, np.nan_to_num(errors[:, j], nan=0.0), width, label=TP_LABELS[metric])
        for i in np.flatnonzero(~np.isfinite(errors[:, j])):
            ax_tp.text(x[i] - 0.4 + (j + 0.5) * width, 0.02, "n/a", rotation=90, fontsize=5, ha="center", va="bottom")
    ax_tp.set_xticks(x)
    ax_tp.set_xticklabels(classes, rotation=45, ha="right", fontsize=8)
    ax_tp.set_ylabel("error (lower is better)")
    ax_tp.legend(fontsize=7, ncol=5, loc="upper center")
    ax_tp.set_ylim(0, max(1.0, float(np.nanmax(errors)) * 1.25) if np.isfinite(errors).any() else 1.0)
    ax_tp.set_title("true-positive errors per class at 2 m (n/a: no true positive)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def _lookup(values: Mapping[Any, float], threshold: float) -> float:
    """Value for a threshold key that may be stored as a float or as a string ("0.5")."""
    for key, value in values.items():
        if abs(float(key) - threshold) < 1e-9:
            return value
    return float("nan")
