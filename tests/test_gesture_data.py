"""HaGRID-format loader (round trip, malformed files) and the synthetic generator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bevperc.gesture.config import GestureDataConfig
from bevperc.gesture.data import (
    AnnotationError,
    GestureDataset,
    SyntheticGestureSpec,
    build_targets,
    cue_visibility,
    generate_synthetic_gestures,
    read_hagrid_annotations,
    write_hagrid_annotations,
)

CLASSES = ["like", "peace"]


def _write_set(root: Path, entries: dict[str, dict[str, dict]], size=(160, 90)) -> None:
    """HaGRID layout: root/ann/<class>.json, root/img/<class>/<id>.jpg (a 16:9 image, like HaGRID)."""
    write_hagrid_annotations(root / "ann", entries)
    for class_name, images in entries.items():
        (root / "img" / class_name).mkdir(parents=True, exist_ok=True)
        for image_id in images:
            Image.new("RGB", size, (120, 90, 60)).save(root / "img" / class_name / f"{image_id}.jpg")


def _entry(boxes, labels, user="u1"):
    return {"bboxes": boxes, "labels": labels, "leading_hand": "right", "leading_conf": 1.0, "user_id": user}


def test_round_trip_and_letterbox(tmp_path: Path) -> None:
    entries = {"like": {"a1": _entry([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.2, 0.2]], ["like", "no_gesture"])},
               "peace": {"b1": _entry([[0.0, 0.0, 0.5, 1.0]], ["peace"], "u2")}}
    _write_set(tmp_path, entries)
    records = read_hagrid_annotations(tmp_path / "ann", tmp_path / "img", CLASSES)
    assert [r.image_id for r in records] == ["a1", "b1"]
    np.testing.assert_allclose(records[0].boxes_xywh, [[0.1, 0.2, 0.3, 0.4]], rtol=1e-6)  # no_gesture dropped
    assert records[0].labels.tolist() == [0] and records[1].labels.tolist() == [1]
    assert records[1].user_id == "u2" and records[0].image_path.name == "a1.jpg"
    cfg = GestureDataConfig(annotations_dir=str(tmp_path / "ann"), images_dir=str(tmp_path / "img"),
                            classes=CLASSES, input_size=32)
    item = GestureDataset(cfg, [32, 64])[0]
    assert [im.shape for im in item["images"]] == [(3, 32, 32), (3, 64, 64)]
    # 160x90 padded to 160x160 with 35 px on top: y maps to (0.2*90+35)/160
    x1, y1 = 0.1, (0.2 * 90 + 35) / 160
    expected = [x1, y1, x1 + 0.3, y1 + 0.4 * 90 / 160]
    torch.testing.assert_close(item["boxes"], torch.tensor([expected]), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "top level must map image id"),
        (json.dumps({"x": {"labels": ["like"]}}), "missing field 'bboxes'"),
        (json.dumps({"x": {"bboxes": [[0.1, 0.1, 0.2]], "labels": ["like"]}}), r"bboxes\[0\] must be 4 numbers"),
        (json.dumps({"x": {"bboxes": [[0.1, 0.1, 0.2, 0.2]], "labels": []}}), "'labels' has 0"),
        (json.dumps({"x": {"bboxes": [[0.1, 0.1, -0.2, 0.2]], "labels": ["like"]}}), "positive w, h"),
        (json.dumps({"x": {"bboxes": [[10, 20, 300, 200]], "labels": ["like"]}}), "not normalised"),
        (json.dumps({"x": {"bboxes": [[0.1, 0.1, 0.2, 0.2]], "labels": ["dance"]}}), r"labels\[0\]='dance'"),
        (json.dumps({"x": {"bboxes": "oops", "labels": ["like"]}}), "field 'bboxes' must be a list"),
    ],
)
def test_malformed_annotation_names_file_and_field(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "like.json").write_text(content)
    (tmp_path / "img" / "like").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "like" / "x.jpg")
    with pytest.raises(AnnotationError, match=message) as info:
        read_hagrid_annotations(tmp_path / "ann", tmp_path / "img", CLASSES)
    assert "like.json" in str(info.value)


def test_missing_image_and_missing_annotations(tmp_path: Path) -> None:
    write_hagrid_annotations(tmp_path / "ann", {"like": {"gone": _entry([[0.1, 0.1, 0.2, 0.2]], ["like"])}})
    with pytest.raises(AnnotationError, match="image 'gone': no file gone"):
        read_hagrid_annotations(tmp_path / "ann", tmp_path / "img", CLASSES)
    with pytest.raises(AnnotationError, match="no annotation file for any configured class"):
        read_hagrid_annotations(tmp_path / "ann", tmp_path / "img", ["ok", "stop"])


def test_train_val_folder_layout_is_found(tmp_path: Path) -> None:
    write_hagrid_annotations(tmp_path / "ann", {"like": {"i9": _entry([[0.1, 0.1, 0.2, 0.2]], ["like"])}})
    (tmp_path / "img" / "train_val_like").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "train_val_like" / "i9.jpg")
    records = read_hagrid_annotations(tmp_path / "ann", tmp_path / "img", CLASSES)
    assert records[0].image_path.parent.name == "train_val_like"


def test_synthetic_set_is_deterministic_and_loadable(tmp_path: Path) -> None:
    spec = SyntheticGestureSpec(image_size=64)
    a = generate_synthetic_gestures(tmp_path / "a", 6, 2, seed=3, spec=spec)
    b = generate_synthetic_gestures(tmp_path / "b", 6, 2, seed=3, spec=spec)
    c = generate_synthetic_gestures(tmp_path / "c", 6, 2, seed=4, spec=spec)
    for name in spec.classes:
        assert (a["train"] / f"{name}.json").read_text() == (b["train"] / f"{name}.json").read_text()
    files_a = sorted(a["images"].rglob("*.png"))
    assert len(files_a) == 8
    assert all(np.array_equal(np.asarray(Image.open(f)), np.asarray(Image.open(tmp_path / "b" / f.relative_to(tmp_path / "a"))))
               for f in files_a)
    assert [(a["train"] / f"{n}.json").read_text() for n in spec.classes] != [(c["train"] / f"{n}.json").read_text() for n in spec.classes]
    records = read_hagrid_annotations(a["train"], a["images"], list(spec.classes))
    assert len(records) == 6
    assert all(1 <= len(r.labels) <= 3 for r in records)


def test_targets_peak_at_centres() -> None:
    boxes = [torch.tensor([[0.25, 0.25, 0.50, 0.75]])]
    t = build_targets(boxes, [torch.tensor([1])], num_classes=2, grid=(16, 16))
    assert t["heatmap"][0, 1].max() == 1 and t["heatmap"][0, 0].max() == 0
    iy, ix = divmod(int(t["heatmap"][0, 1].argmax()), 16)
    assert (iy, ix) == (8, 6)  # centre (0.375, 0.5) * 16 = (6, 8)
    torch.testing.assert_close(t["wh"][0, :, 8, 6], torch.tensor([4.0, 8.0]))
    assert t["mask"].sum() == 1



def test_targets_are_gaussians_over_the_whole_map() -> None:
    """The gesture Gaussians are not cut at their radius (unlike the BEV head's): every cell holds the
    maximum over the objects of the class of exp(-d^2 / (2 sigma^2)), sigma = (2r + 1) / 6, in float32."""
    from bevperc.models.heatmap import gaussian_radius

    generator = torch.Generator().manual_seed(0)
    centres, sides = torch.rand(5, 2, generator=generator), torch.rand(5, 2, generator=generator) * 0.4 + 0.05
    boxes = torch.cat([centres - sides / 2, centres + sides / 2], 1).clamp(0, 1)
    labels = torch.tensor([0, 1, 0, 2, 0])
    h, w = 12, 20
    t = build_targets([boxes], [labels], num_classes=3, grid=(h, w))
    expected, beyond = torch.zeros(3, h, w), torch.ones(3, h, w, dtype=torch.bool)
    ys, xs = torch.arange(h, dtype=torch.float32).view(h, 1), torch.arange(w, dtype=torch.float32).view(1, w)
    for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist()):
        ix, iy = min(int((x1 + x2) / 2 * w), w - 1), min(int((y1 + y2) / 2 * h), h - 1)
        radius = max(0, int(gaussian_radius((y2 - y1) * h, (x2 - x1) * w, min_overlap=0.7)))
        sigma = (2 * radius + 1) / 6
        expected[label] = torch.maximum(expected[label], torch.exp(-((xs - ix) ** 2 + (ys - iy) ** 2) / (2 * sigma**2)))
        beyond[label, max(0, iy - radius): iy + radius + 1, max(0, ix - radius): ix + radius + 1] = False
    assert torch.equal(t["heatmap"][0], expected)
    assert (t["heatmap"][0][beyond] > 0).any()  # the tails reach beyond the radius


def test_class_cue_is_weak_but_present_at_the_student_resolution() -> None:
    """The default grating survives the 128 -> 64 px resize at about half contrast, unaliased;
    the old 6-8 px (at 256) grating did not (<= 0.38 of it, periods below the 2 px Nyquist limit)."""
    vis = cue_visibility(SyntheticGestureSpec(image_size=128), student_size=64, teacher_size=128)
    assert vis["period_student_px"] > 2.0  # resolvable at 64 px
    assert 0.4 < vis["retained_min"] <= vis["retained"] <= vis["retained_max"] < 0.6
    assert vis["contrast_teacher"] > 0.15 and vis["contrast_student"] > 0.08
    old = cue_visibility(SyntheticGestureSpec(image_size=128, grating_period=(6.0, 8.0)))
    assert old["period_student_px"] < 2.0 and old["retained_max"] < 0.4 and old["retained"] < 0.5 * vis["retained"]
    # generating at 256 px: teacher 2 (128 px) and student (64 px) both see resized images
    assert 0.5 < cue_visibility(SyntheticGestureSpec(image_size=256))["retained"] < 0.8
