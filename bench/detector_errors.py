"""Benchmark: where a trained BEV detector's boxes go wrong, per class, on val samples.

Matches each class's detections (score ≥ ``--min-score``) to GT centres of that class within
``--match-m`` metres with the devkit's greedy centre-distance matching (ego frame), then splits the
errors that the nuScenes TP metrics average away:

* **position**: the centre error along the camera ray (radial: depth) and across it (tangential),
  per range band. A radial error much larger than the tangential one is a depth error. The radial
  error is also given in pixels of the network input: how far the ground point under the GT centre
  moves in the image of the camera that sees it when the box moves by that error along its ray (the
  vertical image position of an object's ground contact is the main monocular depth cue, so this
  says how fine the cue would have to be read). Per range band also the BEV head's offset branch
  at the GT centre cells: its error (cells, per coordinate) against that of predicting the cell centre;
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
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from bevperc.models.config import BEVGridConfig

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


def bev_rays(boxes: np.ndarray) -> np.ndarray:
    """Unit vectors ``[M, 2]`` from the ego origin to the BEV centres of ``boxes [M, 9]``."""
    return boxes[:, :2] / np.linalg.norm(boxes[:, :2], axis=1, keepdims=True).clip(min=1e-6)


def pixels_per_radial_metre(gt: np.ndarray, ego_from_camera: np.ndarray, pixels_from_camera: np.ndarray,
                            input_size: tuple[int, int]) -> np.ndarray:
    """Per GT box (``[M, 9]``, ego frame): how many pixels of the network input (``input_size`` (H, W))
    the ground point under its centre moves when the box moves 1 m along its BEV ray, in the camera
    (``ego_from_camera [N, 4, 4]``, ``pixels_from_camera [N, 3, 3]``) whose image holds that point
    (the largest where several do; NaN where none does). ``[M]``."""
    from bevperc.geometry import pixels_from_ego_points

    ground = gt[:, :3].copy()
    ground[:, 2] -= gt[:, 5] / 2
    moved = ground.copy()
    moved[:, :2] += bev_rays(gt)
    pixels, depth = pixels_from_ego_points(np.stack([ground, moved], axis=1)[None], ego_from_camera[:, None],
                                           pixels_from_camera[:, None])  # [N, M, 2, 2], [N, M, 2]
    height, width = input_size
    u, v = pixels[:, :, 0, 0], pixels[:, :, 0, 1]
    seen = (depth.min(axis=-1) > 0.1) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
    shift = np.where(seen, np.linalg.norm(pixels[:, :, 1] - pixels[:, :, 0], axis=-1), np.nan)
    return np.fmax.reduce(shift, axis=0) if len(shift) else np.full(len(gt), np.nan)


def offset_errors(offset: np.ndarray, gt: np.ndarray, grid: "BEVGridConfig") -> tuple[np.ndarray, np.ndarray]:
    """The offset branch ``[2, ny, nx]`` (cells) read at the GT centre cells of ``gt [M, 9]`` (``grid``: the
    model's ``BEVGridConfig``): mean |prediction - target| over x and y, and the same for predicting the cell
    centre (0.5), ``[M]`` each; NaN for centres outside the grid."""
    import torch

    from bevperc.models.centerpoint_head import encode_boxes

    cells, inside, targets = encode_boxes(torch.as_tensor(gt, dtype=torch.float32), grid)
    inside = inside.numpy()
    ix, iy = cells.numpy()[inside].T
    target = targets["offset"].numpy()[inside]
    predicted, centre = np.full(len(gt), np.nan), np.full(len(gt), np.nan)
    predicted[inside] = np.abs(offset[:, iy, ix].T - target).mean(1)
    centre[inside] = np.abs(0.5 - target).mean(1)
    return predicted, centre


def error_rows(pred: np.ndarray, gt: np.ndarray, gt_pixels_per_metre: np.ndarray) -> dict[str, np.ndarray]:
    """Per matched pair (rows of ``pred`` / ``gt``, [M, 9] ego-frame boxes, and the GT boxes'
    :func:`pixels_per_radial_metre`): the error components."""
    ray = bev_rays(gt)
    offset = pred[:, :2] - gt[:, :2]
    yaw = np.abs((pred[:, 6] - gt[:, 6] + np.pi) % (2 * np.pi) - np.pi)
    return {
        "range": np.linalg.norm(gt[:, :2], axis=1),
        "radial": (offset * ray).sum(1),
        "pixels_per_metre": gt_pixels_per_metre,
        "tangential": offset[:, 0] * -ray[:, 1] + offset[:, 1] * ray[:, 0],
        "yaw": yaw,
        "velocity": np.linalg.norm(pred[:, 7:9] - gt[:, 7:9], axis=1),
        "speed": np.linalg.norm(gt[:, 7:9], axis=1),
    }


def _nanmedian(values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)]
    return float(np.median(values)) if len(values) else None


def summarise_offsets(gt_range: np.ndarray, predicted: np.ndarray, centre: np.ndarray) -> list[dict]:
    """Per range band, over every GT centre in the grid: median offset error of the branch and of the cell centre."""
    bands = []
    for low, high in RANGE_BANDS:
        band = (gt_range >= low) & (gt_range < high) & np.isfinite(predicted)
        if band.any():
            bands.append({"range_m": [low, high], "gt_centres": int(band.sum()),
                          "offset_error_cells_median": float(np.median(predicted[band])),
                          "cell_centre_error_cells_median": float(np.median(centre[band]))})
    return bands


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
                          "pixels_per_radial_metre_median": _nanmedian(rows["pixels_per_metre"][band]),
                          "radial_median_abs_pixels": _nanmedian(np.abs(rows["radial"][band])
                                                                 * rows["pixels_per_metre"][band]),
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
    columns = ("boxes", "scores", "samples", "gt", "gt_samples", "gt_pixels_per_metre", "offset", "centre_offset")
    group_of = {name: "+".join(group) for group in cfg.model.head.class_groups for name in group}
    found: dict[str, dict[str, list]] = {name: {key: [] for key in columns} for name in args.classes}
    for sample, (item, outputs, det) in enumerate(iterate_predictions(model, dataset, cfg.eval.batch_size)):
        ego_from_camera = item["ego_from_camera"].numpy().astype(np.float64)
        pixels_from_camera = (item["image_aug"] @ item["intrinsics"]).numpy().astype(np.float64)
        for name, lists in found.items():
            keep = (det["labels"] == CLASS_INDEX[name]) & (det["scores"] >= args.min_score)
            gt = item["gt_boxes"][item["gt_labels"] == CLASS_INDEX[name]].numpy()
            lists["boxes"].append(det["boxes"][keep].numpy())
            lists["scores"].append(det["scores"][keep].numpy())
            lists["samples"].append(np.full(int(keep.sum()), sample))
            lists["gt"].append(gt)
            lists["gt_samples"].append(np.full(len(gt), sample))
            lists["gt_pixels_per_metre"].append(
                pixels_per_radial_metre(gt, ego_from_camera, pixels_from_camera, cfg.data.input_size))
            offset = outputs[f"{group_of[name]}.offset"].float().numpy()
            for key, values in zip(("offset", "centre_offset"), offset_errors(offset, gt, cfg.model.grid)):
                lists[key].append(values)
    summary = {}
    for name, lists in found.items():
        boxes, scores, samples, gt, gt_samples, gt_pixels, offset, centre = (np.concatenate(lists[key]) for key in columns)
        p, g = matched_pairs(boxes, scores, samples, gt, gt_samples, len(dataset), args.match_m)
        summary[name] = summarise(error_rows(boxes[p], gt[g], gt_pixels[g]))
        summary[name]["offset_by_range"] = summarise_offsets(np.linalg.norm(gt[:, :2], axis=1), offset, centre)
    print_tables(summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "classes": summary}, indent=1))


def print_tables(summary: dict[str, dict]) -> None:
    print("| class | matched | range (m) | radial |err| median (m) | radial mean (m) | tangential |err| median (m) "
          "| px per radial m (median) | radial |err| median (px) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        for band in s.get("position_by_range", []):
            low, high = band["range_m"]
            print(f"| {name} | {band['matched']} | {low:.0f}-{high:.0f} | {band['radial_median_abs']:.2f} | "
                  f"{band['radial_mean']:+.2f} | {band['tangential_median_abs']:.2f} | "
                  f"{_format(band['pixels_per_radial_metre_median'])} | {_format(band['radial_median_abs_pixels'])} |")
    print()
    print("| class | range (m) | GT centres | offset branch error median (cells) | cell-centre error median (cells) |")
    print("|---|---|---|---|---|")
    for name, s in summary.items():
        for band in s["offset_by_range"]:
            low, high = band["range_m"]
            print(f"| {name} | {low:.0f}-{high:.0f} | {band['gt_centres']} | {band['offset_error_cells_median']:.3f} | "
                  f"{band['cell_centre_error_cells_median']:.3f} |")
    print()
    print("| class | matched | |yaw err| median (°) | axis err median (°) | flipped > 150° | velocity err (m/s) | zero-velocity err (m/s) |")
    print("|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        if s["matched"]:
            v, z = s["velocity_error_mean"], s["zero_velocity_error_mean"]
            print(f"| {name} | {s['matched']} | {s['yaw_median_abs_deg']:.0f} | {s['axis_median_abs_deg']:.0f} | "
                  f"{100 * s['flipped_share']:.0f} % | {v if v is None else f'{v:.2f}'} | {z if z is None else f'{z:.2f}'} |")


def _format(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
