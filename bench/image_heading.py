"""Benchmark: how well the image head's observation angle tells front from back (``image_head.heading``).

For every GT box whose centre projects into a camera (the image head's own targets,
``bevperc.models.image_head.image_targets``), the head's predicted ``(sin, cos)`` at that feature
cell is compared with the target: the share of boxes whose front/back is right (sign of the cosine,
boxes with |cos| > 0.5), whose left/right is right (sign of the sine, |sin| > 0.5), and whose angle
is within 45 degrees, per class. The BEV boxes' own direction errors are in ``bench/detector_errors.py``.

    python bench/image_heading.py --config configs/demo_cpu.yaml \\
        --checkpoint outputs/demo/train/checkpoints/latest.pth --samples 60 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def agreement(predicted: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Shares of ``[K, 2]`` (sin, cos) predictions that agree with the targets."""
    front = np.abs(target[:, 1]) > 0.5
    side = np.abs(target[:, 0]) > 0.5
    error = np.angle(np.exp(1j * (np.arctan2(predicted[:, 0], predicted[:, 1]) - np.arctan2(target[:, 0], target[:, 1]))))
    return {"boxes": int(len(target)),
            "front_back_right": float((np.sign(predicted[front, 1]) == np.sign(target[front, 1])).mean()),
            "left_right_right": float((np.sign(predicted[side, 0]) == np.sign(target[side, 0])).mean()),
            "within_45_deg": float((np.abs(error) < np.pi / 4).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split", default=None, help="default: the config's data.val_split")
    parser.add_argument("--samples", type=int, default=60, help="first N samples of the split")
    parser.add_argument("--classes", nargs="+", default=["car", "truck", "bus", "pedestrian"])
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import torch

    from bevperc.config import load_run_config
    from bevperc.data.classes import CLASS_INDEX
    from bevperc.data.dataset import NuScenesBEVDataset, collate_bev
    from bevperc.inference import load_detector
    from bevperc.models.image_head import image_targets

    cfg = load_run_config(args.config, args.overrides)
    if not cfg.model.image_head.heading:
        parser.error(f"{args.config}: model.image_head.heading is off: the model predicts no observation angle")
    model = load_detector(cfg, args.checkpoint)
    dataset = NuScenesBEVDataset(cfg.data, args.split or cfg.data.val_split, train=False)
    classes = model.view_transformer.image_head.num_classes
    rows = []
    with torch.no_grad():
        for start in range(0, min(args.samples, len(dataset)), cfg.eval.batch_size):
            batch = collate_bev([dataset[i] for i in range(start, min(start + cfg.eval.batch_size, args.samples))])
            logits = model(batch)["image_heatmap"]
            targets = image_targets(batch, cfg.model.view, as_imaged=cfg.model.image_head.heading_as_imaged)
            predicted = logits[:, classes:].permute(0, 2, 3, 1).reshape(-1, 2)[targets.centres]
            label = targets.heatmap.flatten(0, 1).permute(0, 2, 3, 1).reshape(-1, classes)[targets.centres].argmax(1)
            rows.append(torch.cat([predicted, targets.observation, label[:, None].float()], 1))
    table = torch.cat(rows).numpy()
    summary = {name: agreement(table[table[:, 4] == CLASS_INDEX[name], :2], table[table[:, 4] == CLASS_INDEX[name], 2:4])
               for name in args.classes}
    for name, row in summary.items():
        print(f"{name:12s} boxes {row['boxes']:5d}  front/back right {row['front_back_right']:.3f}  "
              f"left/right right {row['left_right_right']:.3f}  within 45 deg {row['within_45_deg']:.3f}")
    if args.json:
        command = "python bench/image_heading.py " + " ".join(sys.argv[1:])
        Path(args.json).write_text(json.dumps({"command": command, "classes": summary}, indent=1))


if __name__ == "__main__":
    main()
