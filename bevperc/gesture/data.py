"""Gesture data: the HaGRID annotation format, a synthetic HaGRID-format generator, the dataset.

HaGRID layout (github.com/hukenovs/hagrid, README "Annotations"): one JSON per gesture class,
``<annotations_dir>/<class>.json``, mapping image id (file name without extension) to::

    {"bboxes": [[x, y, w, h], ...],   # normalised to [0, 1], top-left based (COCO-like)
     "labels": ["one", "no_gesture"], # one label per box
     "user_id": "...", "leading_hand": "right", "leading_conf": 1.0}

Images live in ``<images_dir>/<class>/<image_id>.jpg`` (the per-class archives; older releases
unpack to ``train_val_<class>/``). Boxes labelled ``no_gesture`` are free hands.

The synthetic generator writes the same format (PNG images, so the fine detail is not destroyed
by JPEG). Its classes differ only by the orientation (0, 45, 90, 135 degrees) of a fine sinusoidal
grating on the hand (skin-coloured clutter blobs without a grating and optional plain
``no_gesture`` hands make the grating necessary for detection too). The grating period is
8.8-10.4 px at 256 px, scaled with the image size: 4.4-5.2 px in the 128 px image teacher 2 sees,
2.2-2.6 px at the student's 64 px, i.e. a frequency just below the 64 px Nyquist limit (period 2 px),
so the cue is clear at 128 px and weak at 64 px; ``cue_visibility`` measures how much of its
contrast a resize keeps. What that contrast is and how the student learns it: docs/methods.md,
part B, "Why these defaults".

The CenterNet targets (``build_targets``) and the gesture focal loss (``train.focal_heatmap_loss``)
are the BEV head's (``models.heatmap``) with two differences of method: the gesture Gaussians are
not cut at their radius, and the focal loss uses ``logsigmoid`` without CenterPoint's probability
clamp.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from bevperc.training.seeding import sample_rng
from bevperc.gesture.config import SYNTHETIC_CLASSES, GestureDataConfig
from bevperc.models.heatmap import draw_gaussians, gaussian_radius
from bevperc.utils.io import atomic_write_json

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class AnnotationError(ValueError):
    """A HaGRID annotation file is malformed; the message names the file and the field."""


@dataclass
class GestureRecord:
    """One annotated image. boxes_xywh: [M,4] normalised top-left x, y, w, h; labels: M class indices."""

    image_id: str
    class_dir: str
    image_path: Path
    boxes_xywh: np.ndarray
    labels: np.ndarray
    user_id: str


# ----------------------------------------------------------------------------- HaGRID reading


def _parse_entry(path: Path, image_id: str, entry: Any, class_index: dict[str, int], ignored: set[str]):
    where = f"{path}: image {image_id!r}"
    if not isinstance(entry, dict):
        raise AnnotationError(f"{where}: expected an object with 'bboxes' and 'labels', got {type(entry).__name__}")
    for key in ("bboxes", "labels"):
        if key not in entry:
            raise AnnotationError(f"{where}: missing field {key!r}")
        if not isinstance(entry[key], list):
            raise AnnotationError(f"{where}: field {key!r} must be a list, got {type(entry[key]).__name__}")
    bboxes, labels = entry["bboxes"], entry["labels"]
    if len(bboxes) != len(labels):
        raise AnnotationError(f"{where}: 'bboxes' has {len(bboxes)} entries but 'labels' has {len(labels)}")
    boxes, label_ids = [], []
    for i, (box, label) in enumerate(zip(bboxes, labels)):
        if not isinstance(label, str):
            raise AnnotationError(f"{where}: labels[{i}] must be a string, got {label!r}")
        if (
            not isinstance(box, (list, tuple))
            or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
        ):
            raise AnnotationError(f"{where}: bboxes[{i}] must be 4 numbers [x, y, w, h], got {box!r}")
        x, y, w, h = (float(v) for v in box)
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            raise AnnotationError(f"{where}: bboxes[{i}] needs finite x, y and positive w, h, got {box!r}")
        if x < -0.5 or y < -0.5 or x + w > 1.5 or y + h > 1.5:
            raise AnnotationError(
                f"{where}: bboxes[{i}]={box!r} is not normalised to [0, 1] (HaGRID boxes are relative)"
            )
        if label in ignored:
            continue
        if label not in class_index:
            raise AnnotationError(
                f"{where}: labels[{i}]={label!r} is neither a configured class {sorted(class_index)} "
                f"nor an ignored label {sorted(ignored)}"
            )
        boxes.append([x, y, w, h])
        label_ids.append(class_index[label])
    user_id = entry.get("user_id", "")
    if not isinstance(user_id, str):
        raise AnnotationError(f"{where}: field 'user_id' must be a string, got {user_id!r}")
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(label_ids, np.int64), user_id


def _check_image_id(path: Path, image_id: str) -> None:
    """An image id names a file in the images folder: no folder part (``/``, ``\\``, ``..``) may take it outside."""
    if not image_id or "/" in image_id or "\\" in image_id or image_id in (".", "..") or "\0" in image_id:
        raise AnnotationError(f"{path}: image id {image_id!r} is not a plain file name (it would point outside "
                              f"the images folder)")


def find_image(images_dir: Path, class_name: str, image_id: str) -> Path | None:
    """HaGRID image path for ``image_id`` of a class, trying the known folder layouts."""
    for folder in (images_dir / class_name, images_dir / f"train_val_{class_name}", images_dir):
        for ext in IMAGE_EXTENSIONS:
            candidate = folder / f"{image_id}{ext}"
            if candidate.is_file():
                return candidate
    return None


def read_hagrid_annotations(
    annotations_dir: str | Path,
    images_dir: str | Path,
    classes: Sequence[str],
    ignored_labels: Sequence[str] = ("no_gesture",),
    require_images: bool = True,
) -> list[GestureRecord]:
    """Read every ``<class>.json`` of ``classes`` found in ``annotations_dir``.

    Classes with no JSON file are skipped (a HaGRID subset may lack some); an image whose file
    is missing raises (``require_images``) naming the paths tried. Records are sorted by
    (class, image id) so the order is deterministic.
    """
    annotations_dir, images_dir = Path(annotations_dir), Path(images_dir)
    if not annotations_dir.is_dir():
        raise AnnotationError(f"annotations_dir {annotations_dir} is not a directory")
    class_index = {name: i for i, name in enumerate(classes)}
    ignored = set(ignored_labels)
    records: list[GestureRecord] = []
    found_any = False
    for class_name in classes:
        path = annotations_dir / f"{class_name}.json"
        if not path.is_file():
            continue
        found_any = True
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
            raise AnnotationError(f"{path}: not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise AnnotationError(f"{path}: top level must map image id -> annotation, got {type(data).__name__}")
        for image_id in sorted(data):
            _check_image_id(path, image_id)
            boxes, labels, user_id = _parse_entry(path, image_id, data[image_id], class_index, ignored)
            image_path = find_image(images_dir, class_name, image_id)
            if image_path is None:
                if require_images:
                    raise AnnotationError(
                        f"{path}: image {image_id!r}: no file {image_id}.(jpg|jpeg|png) in "
                        f"{images_dir / class_name}, {images_dir / ('train_val_' + class_name)} or {images_dir}"
                    )
                image_path = images_dir / class_name / f"{image_id}.jpg"
            records.append(GestureRecord(image_id, class_name, image_path, boxes, labels, user_id))
    if not found_any:
        raise AnnotationError(
            f"{annotations_dir}: no annotation file for any configured class; expected e.g. "
            f"{annotations_dir / (classes[0] + '.json')}"
        )
    return records


def write_hagrid_annotations(annotations_dir: str | Path, per_class: dict[str, dict[str, dict]]) -> None:
    """Write ``{class: {image_id: entry}}`` as one HaGRID ``<class>.json`` per class (atomic)."""
    for class_name, entries in per_class.items():
        atomic_write_json(Path(annotations_dir) / f"{class_name}.json", entries, indent=None)


# ----------------------------------------------------------------------------- image handling


def letterbox_resize(image: Image.Image, size: int) -> tuple[Image.Image, tuple[float, float, float]]:
    """Pad to a centred square (grey), resize to ``size`` (antialiased bilinear).

    Returns the image and (pad_left, pad_top, side) in original pixels, to map boxes.
    """
    w, h = image.size
    side = max(w, h)
    pad_left, pad_top = (side - w) // 2, (side - h) // 2
    if w != h:
        image = ImageOps.pad(image, (side, side), color=(114, 114, 114), centering=(0.5, 0.5))
    if side != size:
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return image, (float(pad_left), float(pad_top), float(side))


def boxes_to_square_xyxy(boxes_xywh: np.ndarray, width: int, height: int, pad: tuple[float, float, float]) -> np.ndarray:
    """Normalised top-left xywh of the original image -> normalised xyxy of the padded square."""
    pad_left, pad_top, side = pad
    x1 = (boxes_xywh[:, 0] * width + pad_left) / side
    y1 = (boxes_xywh[:, 1] * height + pad_top) / side
    x2 = x1 + boxes_xywh[:, 2] * width / side
    y2 = y1 + boxes_xywh[:, 3] * height / side
    return np.clip(np.stack([x1, y1, x2, y2], axis=1), 0.0, 1.0).astype(np.float32)


def normalise_image(image_uint8: Tensor) -> Tensor:
    """[3,H,W] uint8 -> float32 ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image_uint8.float() / 255.0 - mean) / std


def pil_to_uint8(image: Image.Image) -> Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


class GestureDataset(Dataset):
    """HaGRID-format detection data at one or more square input sizes.

    Item: {"images": list of [3,S_k,S_k] float32 (one per ``input_sizes`` entry, normalised),
    "boxes": [M,4] float32 xyxy normalised to the padded square, "labels": [M] int64,
    "image_id": str}. Boxes are resolution-free, so student and teacher 2 share them.
    With ``cfg.hflip`` a sample is flipped when ``sample_rng(seed, epoch, index)`` says so (the
    Trainer's rule for augmentation: the same flips after a resume, whatever the workers).
    """

    def __init__(self, cfg: GestureDataConfig, input_sizes: Sequence[int], records: list[GestureRecord] | None = None,
                 seed: int = 0):
        self.cfg = cfg
        self.input_sizes = list(input_sizes)
        self.seed = seed
        self.epoch = 0
        if records is None:
            records = read_hagrid_annotations(cfg.annotations_dir, cfg.images_dir, cfg.classes, cfg.ignored_labels)
        if cfg.max_images > 0:
            records = records[: cfg.max_images]
        if not records:
            raise AnnotationError(f"{cfg.annotations_dir}: no annotated images found")
        self.records = records
        self._cache: list[tuple[list[Tensor], np.ndarray]] | None = None
        if cfg.cache_images:
            self._cache = [self._load(i) for i in range(len(records))]

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer before each epoch's loader starts (the flips change per epoch)."""
        self.epoch = epoch

    def _load(self, index: int) -> tuple[list[Tensor], np.ndarray]:
        rec = self.records[index]
        try:
            with Image.open(rec.image_path) as raw:
                image = raw.convert("RGB")
        except OSError as err:
            raise AnnotationError(f"{rec.image_path}: cannot read image: {err}") from None
        images = []
        pad = (0.0, 0.0, float(max(image.size)))
        for size in self.input_sizes:
            resized, pad = letterbox_resize(image, size)
            images.append(pil_to_uint8(resized))
        boxes = boxes_to_square_xyxy(rec.boxes_xywh, image.size[0], image.size[1], pad)
        return images, boxes

    def __getitem__(self, index: int) -> dict[str, Any]:
        images, boxes = self._cache[index] if self._cache is not None else self._load(index)
        labels = torch.from_numpy(self.records[index].labels.copy())
        boxes_t = torch.from_numpy(boxes.copy())
        if self.cfg.hflip and sample_rng(self.seed, self.epoch, index).random() < 0.5:
            images = [im.flip(-1) for im in images]
            boxes_t = torch.stack([1 - boxes_t[:, 2], boxes_t[:, 1], 1 - boxes_t[:, 0], boxes_t[:, 3]], 1)
        return {
            "images": [normalise_image(im) for im in images],
            "boxes": boxes_t,
            "labels": labels,
            "image_id": self.records[index].image_id,
        }


def collate_gestures(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images per input size -> "images": list of [B,3,S_k,S_k]; boxes/labels/ids stay lists."""
    n_sizes = len(samples[0]["images"])
    return {
        "images": [torch.stack([s["images"][k] for s in samples]) for k in range(n_sizes)],
        "boxes": [s["boxes"] for s in samples],
        "labels": [s["labels"] for s in samples],
        "image_id": [s["image_id"] for s in samples],
    }


# ----------------------------------------------------------------------------- CenterNet targets


def build_targets(
    boxes: list[Tensor], labels: list[Tensor], num_classes: int, grid: tuple[int, int]
) -> dict[str, Tensor]:
    """Dense CenterNet targets on an ``h x w`` grid from normalised xyxy boxes.

    Returns "heatmap" [B,C,h,w] (Gaussian peaks, 1 at centres), "wh" [B,2,h,w] and "offset"
    [B,2,h,w] (grid cells, valid where "mask" [B,h,w] is 1).
    """
    h, w = grid
    b = len(boxes)
    heat = torch.zeros(b, num_classes, h, w)
    wh = torch.zeros(b, 2, h, w)
    off = torch.zeros(b, 2, h, w)
    mask = torch.zeros(b, h, w)
    peaks: list[tuple[int, int, int, int]] = []  # (heatmap channel b * C + class, ix, iy, radius)
    for bi, (bx, lb) in enumerate(zip(boxes, labels)):
        for box, cls in zip(bx.tolist(), lb.tolist()):
            bw, bh = (box[2] - box[0]) * w, (box[3] - box[1]) * h
            if bw <= 0 or bh <= 0:
                continue
            cx, cy = (box[0] + box[2]) / 2 * w, (box[1] + box[3]) / 2 * h
            ix, iy = min(int(cx), w - 1), min(int(cy), h - 1)
            peaks.append((bi * num_classes + cls, ix, iy, max(0, int(gaussian_radius(bh, bw, min_overlap=0.7)))))
            wh[bi, :, iy, ix] = torch.tensor([bw, bh])
            off[bi, :, iy, ix] = torch.tensor([cx - ix, cy - iy])
            mask[bi, iy, ix] = 1.0
    # CenterNet's overlap 0.7; the Gaussians over the whole map (not cut at the radius), evaluated in float32
    channel, ix, iy, radius = torch.tensor(peaks, dtype=torch.long).reshape(-1, 4).unbind(1)
    draw_gaussians(heat.view(-1, h, w), channel, ix, iy, radius, reach=max(h, w) - 1, compute_dtype=torch.float32)
    return {"heatmap": heat, "wh": wh, "offset": off, "mask": mask}


# ----------------------------------------------------------------------------- synthetic set


@dataclass
class SyntheticGestureSpec:
    """Parameters of the synthetic HaGRID-format gesture set (sizes in generated pixels at 256)."""

    image_size: int = 256
    classes: tuple[str, ...] = tuple(SYNTHETIC_CLASSES)
    min_hands: int = 1
    max_hands: int = 3
    hand_size: tuple[float, float] = (0.17, 0.32)  # hand bbox side as a fraction of the image
    grating_period: tuple[float, float] = (8.8, 10.4)  # px at image_size 256 (scaled with it)
    grating_contrast: float = 0.55
    clutter_shapes: tuple[int, int] = (3, 8)
    no_gesture_prob: float = 0.15  # chance of an extra plain hand labelled no_gesture
    noise_std: float = 6.0  # pixel noise (0-255 scale)


def _class_angle(class_index: int, num_classes: int) -> float:
    """Grating orientation of a class (radians): classes evenly spread over [0, pi)."""
    return math.pi * class_index / num_classes


def _grating(xx: np.ndarray, yy: np.ndarray, angle: float, period: float, phase: float, contrast: float) -> np.ndarray:
    """Multiplicative shading [H,W] of the class cue: ``1 + contrast/2 * sin(2 pi x_angle / period + phase)``."""
    wave = np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period + phase)
    return 1.0 + contrast * 0.5 * wave


def cue_visibility(
    spec: SyntheticGestureSpec | None = None, student_size: int = 64, teacher_size: int = 128, phases: int = 8,
    skin: float = 150.0,
) -> dict[str, float]:
    """How much of the class cue survives the resize to the student's input (the data's key knob).

    Renders a noise-free uniform skin patch [S,S] (S = ``spec.image_size``) carrying each class's
    grating at the shortest, mean and longest period (``phases`` phases each), brings it to
    ``teacher_size`` (teacher 2's input) and ``student_size`` with the dataset's own
    ``letterbox_resize``, and measures the RMS contrast (std / mean over the interior) at both.
    Returns {"contrast_teacher", "contrast_student", "retained" (student / teacher contrast, mean
    over classes, periods and phases), "retained_min"/"retained_max" (over classes and periods),
    "period_student_px" (shortest period at the student's input; 2 px is the Nyquist limit),
    "noise_teacher"/"noise_student" (std of the ``spec.noise_std`` pixel noise at both sizes)}.
    """
    spec = spec or SyntheticGestureSpec()
    s = spec.image_size
    scale = s / 256.0
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)

    def at(values: np.ndarray, size: int) -> np.ndarray:
        image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8)).convert("RGB")
        out = np.asarray(letterbox_resize(image, size)[0], np.float32)[..., 0]
        m = size // 8  # interior: away from the resize filter's border effects
        return out[m:size - m, m:size - m]

    def contrast(values: np.ndarray) -> float:
        return float(values.std() / values.mean())

    periods = (spec.grating_period[0], sum(spec.grating_period) / 2, spec.grating_period[1])
    teacher, student, ratios = [], [], []
    for cls in range(len(spec.classes)):
        for period in periods:
            per_phase = []
            for phase in np.linspace(0, 2 * math.pi, phases, endpoint=False):
                patch = skin * _grating(xx, yy, _class_angle(cls, len(spec.classes)), period * scale, float(phase),
                                        spec.grating_contrast)
                a, b = contrast(at(patch, teacher_size)), contrast(at(patch, student_size))
                teacher.append(a)
                student.append(b)
                per_phase.append(b / a)
            ratios.append(float(np.mean(per_phase)))
    noise = np.random.default_rng(0).normal(0, spec.noise_std, (s, s)) + 128.0
    return {"contrast_teacher": float(np.mean(teacher)), "contrast_student": float(np.mean(student)),
            "retained": float(np.mean(ratios)), "retained_min": float(min(ratios)), "retained_max": float(max(ratios)),
            "period_student_px": spec.grating_period[0] * scale * student_size / s,
            "noise_teacher": float(at(noise, teacher_size).std()), "noise_student": float(at(noise, student_size).std())}


def _render_image(rng: np.random.Generator, spec: SyntheticGestureSpec) -> tuple[np.ndarray, list, list]:
    """One synthetic image [S,S,3] uint8, its hands' normalised xywh boxes and label names."""
    s = spec.image_size
    scale = s / 256.0
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    # Background: smooth colour gradient (low frequency, carries no class information).
    c0, c1 = rng.uniform(40, 200, 3), rng.uniform(40, 200, 3)
    t = (xx * math.cos(rng.uniform(0, 2 * math.pi)) + yy * math.sin(rng.uniform(0, 2 * math.pi))) / s
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    # Clutter: ellipses and rectangles, some skin-coloured (hands without the fine detail).
    for _ in range(int(rng.integers(spec.clutter_shapes[0], spec.clutter_shapes[1] + 1))):
        cx, cy = rng.uniform(0, s, 2)
        rx, ry = rng.uniform(0.03, 0.12, 2) * s
        color = _skin(rng) if rng.random() < 0.3 else rng.uniform(0, 255, 3)
        if rng.random() < 0.5:
            m = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        else:
            m = (np.abs(xx - cx) <= rx) & (np.abs(yy - cy) <= ry)
        img[m] = color
    boxes, labels, placed = [], [], []
    n_hands = int(rng.integers(spec.min_hands, spec.max_hands + 1))
    extra = rng.random() < spec.no_gesture_prob
    for k in range(n_hands + int(extra)):
        for _attempt in range(30):
            side = rng.uniform(*spec.hand_size) * s
            aspect = rng.uniform(0.75, 1.3)
            bw, bh = side * math.sqrt(aspect), side / math.sqrt(aspect)
            x0, y0 = rng.uniform(0, s - bw), rng.uniform(0, s - bh)
            if all(_iou((x0, y0, bw, bh), p) < 0.05 for p in placed):
                break
        else:
            continue
        placed.append((x0, y0, bw, bh))
        cx, cy, rx, ry = x0 + bw / 2, y0 + bh / 2, bw / 2, bh / 2
        m = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        skin = _skin(rng)
        gesture = k < n_hands
        if gesture:
            cls = int(rng.integers(len(spec.classes)))
            angle = _class_angle(cls, len(spec.classes)) + rng.normal(0, 0.06)
            period = rng.uniform(*spec.grating_period) * scale
            phase = rng.uniform(0, 2 * math.pi)
            shade = _grating(xx, yy, angle, period, phase, spec.grating_contrast)
            img[m] = np.clip(skin[None] * shade[m][:, None], 0, 255)
            labels.append(spec.classes[cls])
        else:
            img[m] = skin
            labels.append("no_gesture")
        boxes.append([x0 / s, y0 / s, bw / s, bh / s])
    img = img + rng.normal(0, spec.noise_std, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), boxes, labels


def _skin(rng: np.random.Generator) -> np.ndarray:
    base = np.array([200.0, 150.0, 120.0]) * rng.uniform(0.55, 1.15)
    return np.clip(base + rng.normal(0, 10, 3), 0, 255)


def _iou(a: tuple, b: tuple) -> float:
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax2, bx2) - max(a[0], b[0]))
    ih = max(0.0, min(ay2, by2) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def generate_synthetic_gestures(
    out_dir: str | Path,
    num_train: int = 400,
    num_test: int = 100,
    seed: int = 0,
    spec: SyntheticGestureSpec | None = None,
    progress: bool = False,
) -> dict[str, Path]:
    """Write a HaGRID-format synthetic set; deterministic per ``seed``.

    Layout: ``out_dir/images/<class>/<id>.png`` and ``out_dir/annotations/{train,test}/<class>.json``.
    The image's folder/JSON class is that of its first hand (as in HaGRID, where other hands may
    carry other labels). Returns {"images": ..., "train": ..., "test": ...} directories.
    """
    spec = spec or SyntheticGestureSpec()
    out = Path(out_dir)
    images_dir = out / "images"
    paths = {"images": images_dir}
    iterator_splits = [("train", num_train, 0), ("test", num_test, 1)]
    for split, count, split_id in iterator_splits:
        per_class: dict[str, dict[str, dict]] = {c: {} for c in spec.classes}
        rng = np.random.default_rng([seed, split_id])
        users = [f"{int(v):016x}" for v in rng.integers(0, 2**62, size=max(1, count // 5))]
        rows = range(count)
        if progress:
            from tqdm import tqdm

            rows = tqdm(rows, desc=f"synthetic {split}")
        for i in rows:
            image, boxes, labels = _render_image(rng, spec)
            gesture_labels = [lb for lb in labels if lb != "no_gesture"]
            class_dir = gesture_labels[0] if gesture_labels else spec.classes[0]
            image_id = f"{split}_{seed:03d}_{i:06d}"
            path = images_dir / class_dir / f"{image_id}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
            per_class[class_dir][image_id] = {
                "bboxes": [[round(float(v), 6) for v in b] for b in boxes],
                "labels": labels,
                "leading_hand": "right" if rng.random() < 0.5 else "left",
                "leading_conf": 1.0,
                "user_id": users[int(rng.integers(len(users)))],
            }
        ann_dir = out / "annotations" / split
        write_hagrid_annotations(ann_dir, per_class)
        paths[split] = ann_dir
    return paths
