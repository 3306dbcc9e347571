"""Benchmark: where a trained BEV detector's boxes go wrong, per class, on val samples.

Matches each class's detections (score ≥ ``--min-score``) to GT centres of that class within
``--match-m`` metres with the devkit's greedy centre-distance matching (ego frame), then splits the
errors that the nuScenes TP metrics average away:

* **position**: the centre error along the camera ray (radial: depth) and across it (tangential),
  per range band. A radial error much larger than the tangential one is a depth error;
* **orientation**: |yaw error|, the error modulo π (the box axis), and the share of boxes turned
  by more than 150° (front/back flips, which the devkit's AOE counts in full for all but barriers);
* **velocity**: the error of the predicted velocity, against that of predicting zero.

    python bench/detector_errors.py --config configs/demo_cpu.yaml \\
        --checkpoint outputs/demo/train/checkpoints/latest.pth --samples 100 --json errors.json

Prints one markdown table per error kind; ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RANGE_BANDS = ((0.0, 15.0), (15.0, 30.0), (30.0, 55.0))
FLIP_RADIANS = np.deg2rad(150.0)


def matched_pairs(pred: np.ndarray, score: np.ndarray, pred_sample: np.ndarray, gt: np.ndarray,
                  gt_sample: np.ndarray, n_samples: int, max_distance: float) -> tuple[np.ndarray, np.ndarray]:
    """The devkit's greedy centre-distance matching of one class at one threshold (the fast evaluator's
    ``match_class``, predictions best score first): rows of ``pred [P, 9]`` and ``gt [G, 9]`` that pair up."""
    from bevperc.evaluation.metrics import match_class, score_order

    order = score_order(score)
    matched = match_class(gt[:, :2], gt_sample, pred[order, :2], pred_sample[order], n_samples, [max_distance])[0]
    hit = matched >= 0
    return order[hit], matched[hit]


def error_rows(pred: np.ndarray, gt: np.ndarray) -> dict[str, np.ndarray]:
    """Per matched pair (rows of ``pred`` / ``gt``, [M, 9] ego-frame boxes): the error components."""
    ray = gt[:, :2] / np.linalg.norm(gt[:, :2], axis=1, keepdims=True).clip(min=1e-6)
    offset = pred[:, :2] - gt[:, :2]
    yaw = np.abs((pred[:, 6] - gt[:, 6] + np.pi) % (2 * np.pi) - np.pi)
    return {
        "range": np.linalg.norm(gt[:, :2], axis=1),
        "radial": (offset * ray).sum(1),
        "tangential": offset[:, 0] * -ray[:, 1] + offset[:, 1] * ray[:, 0],
        "yaw": yaw,
        "velocity": np.linalg.norm(pred[:, 7:9] - gt[:, 7:9], axis=1),
        "speed": np.linalg.norm(gt[:, 7:9], axis=1),
    }


def summarise(rows: dict[str, np.ndarray]) -> dict[str, float | int | list]:
    if not len(rows["range"]):
        return {"matched": 0}
    yaw = rows["yaw"]
    bands = []
    for low, high in RANGE_BANDS:
        band = (rows["range"] >= low) & (rows["range"] < high)
        if band.any():
            bands.append({"range_m": [low, high], "matched": int(band.sum()),
                          "radial_median_abs": float(np.median(np.abs(rows["radial"][band]))),
                          "radial_mean": float(rows["radial"][band].mean()),
                          "tangential_median_abs": float(np.median(np.abs(rows["tangential"][band])))})
    finite = np.isfinite(rows["velocity"])
    return {
        "matched": int(len(yaw)),
        "position_by_range": bands,
        "yaw_median_abs_deg": float(np.rad2deg(np.median(yaw))),
        "axis_median_abs_deg": float(np.rad2deg(np.median(np.minimum(yaw, np.pi - yaw)))),
        "flipped_share": float(np.mean(yaw > FLIP_RADIANS)),
        "velocity_error_mean": float(rows["velocity"][finite].mean()) if finite.any() else None,
        "zero_velocity_error_mean": float(rows["speed"][finite].mean()) if finite.any() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split", default=None, help="default: the config's data.val_split")
    parser.add_argument("--samples", type=int, default=100, help="first N samples of the split")
    parser.add_argument("--classes", nargs="+", default=["car", "pedestrian", "barrier"])
    parser.add_argument("--min-score", type=float, default=0.2)
    parser.add_argument("--match-m", type=float, default=4.0, help="the devkit's largest distance threshold")
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import torch

    from bevperc.config import load_run_config
    from bevperc.data.classes import CLASS_INDEX
    from bevperc.data.dataset import NuScenesBEVDataset
    from bevperc.inference import iterate_predictions, load_detector

    cfg = load_run_config(args.config, args.overrides)
    model = load_detector(cfg, args.checkpoint)
    dataset = NuScenesBEVDataset(cfg.data, args.split or cfg.data.val_split, train=False)
    dataset = torch.utils.data.Subset(dataset, range(min(args.samples, len(dataset))))
    columns = ("boxes", "scores", "samples", "gt", "gt_samples")
    found: dict[str, dict[str, list]] = {name: {key: [] for key in columns} for name in args.classes}
    for sample, (item, _, det) in enumerate(iterate_predictions(model, dataset, cfg.eval.batch_size)):
        for name, lists in found.items():
            keep = (det["labels"] == CLASS_INDEX[name]) & (det["scores"] >= args.min_score)
            gt = item["gt_boxes"][item["gt_labels"] == CLASS_INDEX[name]].numpy()
            lists["boxes"].append(det["boxes"][keep].numpy())
            lists["scores"].append(det["scores"][keep].numpy())
            lists["samples"].append(np.full(int(keep.sum()), sample))
            lists["gt"].append(gt)
            lists["gt_samples"].append(np.full(len(gt), sample))
    summary = {}
    for name, lists in found.items():
        boxes, scores, samples, gt, gt_samples = (np.concatenate(lists[key]) for key in columns)
        p, g = matched_pairs(boxes, scores, samples, gt, gt_samples, len(dataset), args.match_m)
        summary[name] = summarise(error_rows(boxes[p], gt[g]))
    print_tables(summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "classes": summary}, indent=1))


def print_tables(summary: dict[str, dict]) -> None:
    print("| class | matched | range (m) | radial |err| median (m) | radial mean (m) | tangential |err| median (m) |")
    print("|---|---|---|---|---|---|")
    for name, s in summary.items():
        for band in s.get("position_by_range", []):
            low, high = band["range_m"]
            print(f"| {name} | {band['matched']} | {low:.0f}-{high:.0f} | {band['radial_median_abs']:.2f} | "
                  f"{band['radial_mean']:+.2f} | {band['tangential_median_abs']:.2f} |")
    print()
    print("| class | matched | |yaw err| median (°) | axis err median (°) | flipped > 150° | velocity err (m/s) | zero-velocity err (m/s) |")
    print("|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        if s["matched"]:
            v, z = s["velocity_error_mean"], s["zero_velocity_error_mean"]
            print(f"| {name} | {s['matched']} | {s['yaw_median_abs_deg']:.0f} | {s['axis_median_abs_deg']:.0f} | "
                  f"{100 * s['flipped_share']:.0f} % | {v if v is None else f'{v:.2f}'} | {z if z is None else f'{z:.2f}'} |")


if __name__ == "__main__":
    main()
