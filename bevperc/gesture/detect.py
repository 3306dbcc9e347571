"""Run a trained gesture detector on a folder of images: annotated images + one JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from bevperc.gesture.data import IMAGE_EXTENSIONS, letterbox_resize, normalise_image, pil_to_uint8
from bevperc.gesture.train import load_centernet
from bevperc.models.centernet import decode_centernet
from bevperc.utils.io import atomic_write_json

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]


@torch.no_grad()
def detect_folder(
    checkpoint: str | Path,
    image_dir: str | Path,
    out_dir: str | Path,
    score_threshold: float = 0.3,
    max_detections: int = 20,
    pattern: str = "*",
) -> dict[str, Any]:
    """Detect gestures in every image of ``image_dir`` whose name matches ``pattern`` (recursively).

    Writes ``out_dir/<relative path>.png`` with boxes drawn and ``out_dir/detections.json``
    {image path: [{"label", "score", "box_xyxy" (original pixels), "box_xywh_norm" (HaGRID)}]}.
    """
    model, payload = load_centernet(checkpoint)
    classes, size = payload["classes"], payload["input_size"]
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    paths = sorted(p for p in image_dir.rglob(pattern) if p.suffix in IMAGE_EXTENSIONS)
    if not paths:
        raise FileNotFoundError(f"{image_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    report: dict[str, Any] = {}
    for path in paths:
        try:
            with Image.open(path) as raw:
                image = raw.convert("RGB")
        except OSError as err:
            raise OSError(f"{path}: cannot read image ({err})") from None
        square, (pad_left, pad_top, side) = letterbox_resize(image, size)
        out = model(normalise_image(pil_to_uint8(square))[None])
        det = decode_centernet(out.heatmap, out.wh, out.offset, model.output_stride, max_detections, score_threshold)[0]
        scale = side / size
        entries = []
        draw = ImageDraw.Draw(image)
        for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
            x1, y1, x2, y2 = (box[0] * scale - pad_left, box[1] * scale - pad_top,
                              box[2] * scale - pad_left, box[3] * scale - pad_top)
            x1, x2 = max(0.0, x1), min(float(image.width), x2)
            y1, y2 = max(0.0, y1), min(float(image.height), y2)
            name = classes[label]
            entries.append({"label": name, "score": round(score, 4), "box_xyxy": [round(v, 2) for v in (x1, y1, x2, y2)],
                            "box_xywh_norm": [x1 / image.width, y1 / image.height,
                                              (x2 - x1) / image.width, (y2 - y1) / image.height]})
            color = PALETTE[label % len(PALETTE)]
            draw.rectangle([x1, y1, x2, y2], outline=color, width=max(1, image.width // 160))
            draw.text((x1 + 2, y1 + 1), f"{name} {score:.2f}", fill=color)
        rel = path.relative_to(image_dir)
        target = (out_dir / rel).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target)
        report[str(rel)] = entries
    atomic_write_json(out_dir / "detections.json", report)
    return report
