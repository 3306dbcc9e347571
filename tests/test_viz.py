"""bevperc.viz: projection and clipping maths, boxes on the synthetic and the real nuScenes images, figure files.

The synthetic set (tiny, generated once per session and shared with test_notebooks.py
through the session's base temp folder) colours every object by class, so a box centre
projected with the drawing code must land on a pixel of its class colour. The real
keyframe in ../shared/data/nuscenes-real-sample is read in place (never copied).
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from bevperc.data.classes import CLASS_INDEX, DETECTION_CLASSES  # noqa: E402
from bevperc.geometry import box_corners  # noqa: E402
from bevperc.viz import bev, cameras, depth, loss_engine  # noqa: E402
from bevperc.viz.cameras import CAMERA_NAMES, project_box_centers, project_box_edges  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REAL_SAMPLE = REPO.parent / "shared" / "data" / "nuscenes-real-sample"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """The tiny synthetic set (10 scenes x 2 keyframes, 1/4 render scale), shared by the viz test files."""
    from bevperc.viz.demo import ensure_demo_dataset

    return ensure_demo_dataset(tmp_path_factory.getbasetemp() / "bevperc_viz_demo_data")


def _load_synthetic_sample(root: Path, index: int = 0, split: str = "mini_train"):
    from PIL import Image

    sample = json.loads((root / f"bevperc_infos_{split}.json").read_text())["samples"][index]
    images, intrinsics, ego_from_camera = [], [], []
    for cam in CAMERA_NAMES:
        info = sample["cameras"][cam]
        images.append(np.asarray(Image.open(root / info["path"]).convert("RGB")))
        intrinsics.append(np.asarray(info["intrinsics"], dtype=np.float64))
        ego_from_camera.append(np.asarray(info["ego_from_camera"], dtype=np.float64))
    boxes = np.asarray(sample["gt"]["boxes"], dtype=np.float64).reshape(-1, 9)
    labels = np.array([CLASS_INDEX[name] for name in sample["gt"]["names"]], dtype=np.int64)
    return np.stack(images), np.stack(intrinsics), np.stack(ego_from_camera), boxes, labels


def _first_hit(origin: np.ndarray, direction: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Ray-box slab test: distance along the ray to each box (inf when missed), boxes in the box convention."""
    out = np.full(len(boxes), np.inf)
    for i, box in enumerate(boxes):
        cos, sin = math.cos(box[6]), math.sin(box[6])
        rot_t = np.array([[cos, sin, 0.0], [-sin, cos, 0.0], [0.0, 0.0, 1.0]])  # ego -> box local
        o, d = rot_t @ (origin - box[:3]), rot_t @ direction
        half = np.array([box[4], box[3], box[5]]) / 2  # local x along l, y along w
        with np.errstate(divide="ignore", invalid="ignore"):
            t1, t2 = (-half - o) / d, (half - o) / d
        near, far = np.nanmax(np.minimum(t1, t2)), np.nanmin(np.maximum(t1, t2))
        if far >= max(near, 0):
            out[i] = max(near, 0)
    return out


# --------------------------------------------------------------------------- maths
def test_near_plane_clipping_cuts_crossing_edges_and_drops_hidden_ones():
    starts = np.array([[0.0, 0.0, -1.0], [0.0, 0.0, -2.0], [1.0, 0.0, 2.0]])
    ends = np.array([[0.0, 0.0, 3.0], [0.0, 0.0, -0.5], [1.0, 0.0, 4.0]])
    clipped_starts, clipped_ends, keep = cameras.clip_segments_to_near_plane(starts, ends, near=0.1)
    assert keep.tolist() == [True, False, True]
    assert clipped_starts[0, 2] == pytest.approx(0.1)  # cut where the edge crosses z = near
    assert clipped_ends[0, 2] == pytest.approx(3.0)
    np.testing.assert_allclose(clipped_starts[2], starts[2])  # in front: untouched


def test_box_edges_behind_or_straddling_the_camera():
    identity_camera = np.eye(4)
    identity_camera[:3, :3] = [[0, 0, 1], [-1, 0, 0], [0, -1, 0]]  # camera z = ego x (OpenCV axes)
    k = np.array([[1000.0, 0, 800], [0, 1000.0, 450], [0, 0, 1]])
    behind = np.array([[-10.0, 0, 0, 2, 4, 1.5, 0.3, 0, 0]])
    assert len(project_box_edges(behind, k, identity_camera)[0]) == 0
    straddling = np.array([[0.0, 0, 0, 2, 6, 1.5, 0.0, 0, 0]])  # camera inside the box's x span
    segments = project_box_edges(straddling, k, identity_camera)[0]
    assert 0 < len(segments) < 13  # edges behind dropped, crossing edges clipped
    assert np.isfinite(segments).all()
    front = np.array([[20.0, 1.0, 0.5, 2, 4, 1.5, 0.0, 0, 0]])
    segments = project_box_edges(front, k, identity_camera)[0]
    assert segments.shape == (13, 2, 2)
    pixels, depth_m = project_box_centers(front, k, identity_camera)
    assert depth_m[0] == pytest.approx(20.0)
    # y = +1 m (left) -> left of the principal point; z = 0.5 m above the camera -> above it
    np.testing.assert_allclose(pixels[0], [800 - 1000 * 1 / 20, 450 - 1000 * 0.5 / 20])


def test_bev_grid_orientation_matches_box_plot():
    """A hot cell at ego (x=20, y=10) on a rows=y, cols=x grid lands at plot (-y, x) like the boxes."""
    bev_range = (-50.0, 50.0, -50.0, 50.0)
    grid = np.zeros((100, 100))
    grid[int(10 + 50), int(20 + 50)] = 1.0  # row = y index, col = x index, 1 m cells
    image = bev.grid_to_plot_image(grid)
    row, col = np.unravel_index(np.argmax(image), image.shape)
    left, right, bottom, top = bev.plot_extent(bev_range)
    u = left + (col + 0.5) * (right - left) / image.shape[1]
    v = bottom + (row + 0.5) * (top - bottom) / image.shape[0]  # origin="lower"
    expected_u, expected_v = bev.ego_to_plot(np.array(20.5), np.array(10.5))
    assert (u, v) == (pytest.approx(float(expected_u)), pytest.approx(float(expected_v)))


def test_feature_rgb_and_expected_depth():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(8, 16, 20))
    for method in ("pca", "mean"):
        rgb = bev.bev_features_to_rgb(features, method)
        assert rgb.shape == (16, 20, 3) and rgb.min() >= 0 and rgb.max() <= 1
    with pytest.raises(ValueError, match="features"):
        bev.bev_features_to_rgb(features[0])
    bins = np.arange(1.5, 10.0, 1.0)
    probs = np.zeros((len(bins), 2, 3))
    probs[3] = 1.0  # all mass on bin centre 4.5 m
    np.testing.assert_allclose(depth.expected_depth(probs, bins), 4.5)


def test_lidar_depth_map_keeps_the_nearest_point():
    ego_from_camera = np.eye(4)
    ego_from_camera[:3, :3] = [[0, 0, 1], [-1, 0, 0], [0, -1, 0]]
    k = np.array([[100.0, 0, 50], [0, 100.0, 50], [0, 0, 1]])
    points = np.array([[10.0, 0, 0], [5.0, 0, 0], [-5.0, 0, 0]])  # same pixel twice, one behind
    depth_map = depth.lidar_depth_map(points, k, ego_from_camera, (100, 100))
    assert depth_map[50, 50] == pytest.approx(5.0)
    assert (depth_map > 0).sum() == 1


# --------------------------------------------------------------------------- synthetic images
def test_projected_box_centres_land_on_their_class_colour(demo_root):
    """Every unoccluded box centre projects onto a pixel with its class's hue (synthetic CLASS_COLOURS)."""
    from bevperc.synthetic import CLASS_COLOURS

    matched = checked = 0
    for index in range(2):
        images, intrinsics, ego_from_camera, boxes, labels = _load_synthetic_sample(demo_root, index)
        for cam in range(len(CAMERA_NAMES)):
            height, width = images[cam].shape[:2]
            pixels, depth_m = project_box_centers(boxes, intrinsics[cam], ego_from_camera[cam])
            camera_origin = ego_from_camera[cam][:3, 3]
            for i in np.flatnonzero((depth_m > 2) & (depth_m < 45)):
                u, v = pixels[i]
                name = DETECTION_CLASSES[labels[i]]
                # cones have a white band and barriers white stripes across their centre
                if not (2 <= u < width - 2 and 2 <= v < height - 2) or name in ("traffic_cone", "barrier"):
                    continue
                direction = boxes[i, :3] - camera_origin
                direction /= np.linalg.norm(direction)
                if int(np.argmin(_first_hit(camera_origin, direction, boxes))) != i:
                    continue  # another annotated box is in front of this centre
                patch = images[cam][int(v) - 1 : int(v) + 2, int(u) - 1 : int(u) + 2].reshape(-1, 3) / 255.0
                hsv = np.array([colorsys.rgb_to_hsv(*p) for p in patch])
                pixel_hue = hsv[np.argmax(hsv[:, 1]), 0] * 360  # most saturated pixel of the 3x3 patch
                ref_hue = colorsys.rgb_to_hsv(*(np.array(CLASS_COLOURS[name]) / 255.0))[0] * 360
                hue_error = min(abs(pixel_hue - ref_hue), 360 - abs(pixel_hue - ref_hue))
                checked += 1
                matched += hue_error < 20  # classes are ~35 deg apart, jitter is +-8 deg
    print(f"{matched}/{checked} unoccluded box centres on their class colour")
    assert checked >= 10, f"too few unoccluded boxes to check ({checked})"
    # unannotated clutter (trees, poles, buildings) can still hide a few centres
    assert matched / checked >= 0.85, f"only {matched}/{checked} box centres land on their class colour"


def test_camera_figure_draws_the_visible_boxes(demo_root):
    images, intrinsics, ego_from_camera, boxes, labels = _load_synthetic_sample(demo_root, 0)
    fig = cameras.plot_camera_views(
        images, intrinsics, ego_from_camera, boxes, labels, boxes[:3], np.array([0.9, 0.5, 0.1]), labels[:3]
    )
    front = fig.axes[1]  # CAM_FRONT sits top middle
    assert front.get_title().startswith("CAM_FRONT ")
    visible = cameras.boxes_visible_in_image(boxes, intrinsics[1], ego_from_camera[1], images[1].shape[1::-1])
    assert f"GT {int(visible.sum())}, pred " in front.get_title()
    # one LineCollection per drawn box; its segments are exactly the projected, clipped edges
    first_visible = int(np.flatnonzero(visible)[0])
    expected = project_box_edges(boxes[first_visible : first_visible + 1], intrinsics[1], ego_from_camera[1])[0]
    drawn = front.collections[0].get_segments()
    np.testing.assert_allclose(np.asarray(drawn), expected, atol=1e-6)
    # the 0.1 prediction is below the default 0.3 threshold: at most 2 scored labels per view
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert not any(t.endswith("0.10") for t in texts)


def test_write_sample_figures_files(demo_root, tmp_path):
    from PIL import Image

    from bevperc.viz import write_sample_figures

    images, intrinsics, ego_from_camera, boxes, labels = _load_synthetic_sample(demo_root, 1)
    rng = np.random.default_rng(0)
    bins = np.arange(1.5, 60.0, 1.0)
    depth_probs = rng.dirichlet(np.ones(len(bins)), size=(6, 8, 22)).transpose(0, 3, 1, 2)
    paths = write_sample_figures(
        tmp_path, images, intrinsics, ego_from_camera, boxes, labels, boxes, np.ones(len(boxes)), labels,
        lidar_points=rng.uniform(-40, 40, size=(500, 3)),
        bev_features=rng.normal(size=(16, 32, 32)), heatmaps=rng.uniform(size=(10, 32, 32)),
        depth_probs=depth_probs, depth_bins=bins, prefix="worst_00_", title="test",
    )  # fmt: skip
    assert set(paths) == {"cameras", "bev", "depth_CAM_FRONT"}
    for path in paths.values():
        assert path.name.startswith("worst_00_") and path.is_file()
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        assert pixels.shape[0] > 300 and pixels.std() > 10  # a real picture, not a blank canvas
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_sample_quality_ranks_good_detections_above_bad_ones():
    from bevperc.viz import sample_quality

    gt = np.array([[10.0, 0, 0, 2, 4, 1.5, 0, 0, 0], [20.0, 5, 0, 0.7, 0.7, 1.8, 0, 0, 0]])
    labels = np.array([0, 8])
    assert sample_quality(gt, labels, gt + [0.5, 0, 0, 0, 0, 0, 0, 0, 0], [0.9, 0.8], labels) == 1.0
    assert sample_quality(gt, labels, gt, [0.9, 0.8], [0, 0]) == 0.5  # the pedestrian called a car
    assert sample_quality(gt, labels, gt + [5.0, 0, 0, 0, 0, 0, 0, 0, 0], [0.9, 0.8], labels) == 0.0
    assert sample_quality(gt, labels, gt, [0.9, 0.1], labels) == pytest.approx(2 / 3)  # one below threshold
    assert sample_quality(None, None, None, None, None) == 1.0


# --------------------------------------------------------------------------- the real nuScenes keyframe
@pytest.fixture(scope="module")
def real_sample():
    if not (REAL_SAMPLE / "sample_info.json").is_file():
        pytest.skip(f"real nuScenes sample not found at {REAL_SAMPLE}")
    from bevperc.viz.samples import load_info_sample

    return load_info_sample(REAL_SAMPLE)


def test_real_sample_boxes_match_the_annotated_projections(real_sample):
    """Centres and corner extents projected by bevperc.viz agree with the sample's own 2D annotations."""
    info = json.loads((REAL_SAMPLE / "sample_info.json").read_text())["data_list"][0]
    centre_errors, extent_errors = [], []
    for cam, name in enumerate(CAMERA_NAMES):
        pixels, depth_m = project_box_centers(real_sample.gt_boxes, real_sample.intrinsics[cam], real_sample.ego_from_camera[cam])
        corners = box_corners(real_sample.gt_boxes).reshape(-1, 3)
        corner_px, corner_depth = cameras.project_points(corners, real_sample.intrinsics[cam], real_sample.ego_from_camera[cam])
        corner_px, corner_depth = corner_px.reshape(-1, 8, 2), corner_depth.reshape(-1, 8)
        for instance in info["cam_instances"][name]:
            if instance["bbox_label_3d"] < 0:
                continue
            # center_2d / depth: the projected geometric box centre; match it to the nearest of ours
            distance = np.linalg.norm(pixels - instance["center_2d"], axis=1) + 10 * np.abs(depth_m - instance["depth"])
            i = int(np.nanargmin(distance))
            centre_errors.append(distance[i])
            lo, hi = corner_px[i].min(0), corner_px[i].max(0)
            if (corner_depth[i] > 0.5).all() and lo.min() > 0 and hi[0] < 1600 and hi[1] < 900:
                extent_errors.append(np.abs(np.r_[lo, hi] - instance["bbox"]).max())
    assert len(centre_errors) > 40 and len(extent_errors) > 30
    assert np.median(centre_errors) < 0.5 and np.percentile(centre_errors, 80) < 2.0
    # the 2D boxes are the projected corners' extents: sizes, yaw and z are converted right
    assert np.median(extent_errors) < 2.0 and np.percentile(extent_errors, 75) < 4.0


def test_real_sample_lidar_counts_match_annotations(real_sample):
    """Points in the converted boxes match num_lidar_pts: the boxes sit where the LiDAR saw the objects."""
    from bevperc.geometry import points_in_boxes

    info = json.loads((REAL_SAMPLE / "sample_info.json").read_text())["data_list"][0]
    kept = [inst for inst in info["instances"] if inst["bbox_label_3d"] >= 0 and inst.get("bbox_3d_isvalid", True)]
    expected = np.array([inst["num_lidar_pts"] for inst in kept])
    counted = points_in_boxes(real_sample.lidar_points[:, :3], real_sample.gt_boxes).sum(1)
    assert len(counted) == len(expected)
    assert np.abs(counted - expected).sum() <= 0.1 * expected.sum()


def test_real_sample_figures(real_sample, tmp_path):
    fig = cameras.plot_camera_views(
        real_sample.images, real_sample.intrinsics, real_sample.ego_from_camera, real_sample.gt_boxes, real_sample.gt_labels
    )
    titles = {ax.get_title().split()[0]: ax.get_title() for ax in fig.axes if ax.get_title()}
    assert set(titles) == set(CAMERA_NAMES)
    assert "GT 0)" not in titles["CAM_FRONT"] and "pred" not in titles["CAM_FRONT"]  # GT only, many objects
    fig = bev.plot_bev_overview(real_sample.lidar_points, real_sample.gt_boxes, real_sample.gt_labels)
    assert len(fig.axes[0].patches) >= len(real_sample.gt_boxes)  # one footprint per box (+ rings, ego)


# --------------------------------------------------------------------------- open3d
def test_lidar3d_ply_and_render(tmp_path):
    o3d = pytest.importorskip("open3d")
    from bevperc.viz import lidar3d

    rng = np.random.default_rng(0)
    points = rng.uniform(-20, 20, size=(300, 4))
    boxes = np.array([[5.0, 2.0, 0.8, 2.0, 4.5, 1.6, 0.4, 1.0, 0.0], [-8.0, -3.0, 0.9, 0.7, 0.7, 1.8, 0.0, 0.0, 0.0]])
    labels = np.array([0, 8])
    vertices, lines, colours = lidar3d.box_line_set_arrays(boxes, labels)
    assert vertices.shape == (20, 3) and lines.shape == (26, 2) and colours.shape == (26, 3)
    np.testing.assert_allclose(vertices[:8], box_corners(boxes[:1])[0])
    paths = lidar3d.save_scene_ply(tmp_path, points, boxes, labels, boxes[:1], labels[:1])
    assert len(o3d.io.read_point_cloud(str(paths["points"])).points) == 300
    assert len(o3d.io.read_line_set(str(paths["gt_boxes"])).lines) == 26
    assert len(o3d.io.read_line_set(str(paths["pred_boxes"])).lines) == 13
    result = lidar3d.render_scene_png(tmp_path / "scene.png", points, boxes, labels, width=320, height=240)
    assert result.path.is_file() and result.backend in ("open3d", "matplotlib")
    if result.backend == "matplotlib":
        assert result.note  # the fallback says why


# --------------------------------------------------------------------------- loss engine and gestures
def _engine_summary(**options) -> dict:
    import torch

    from bevperc.losses.engine import LossEngine, LossEngineConfig

    torch.manual_seed(0)
    names = ["car.heatmap", "car.size", "ped.heatmap", "ped.size", "vel"]
    engine = LossEngine(names, LossEngineConfig(warmup_steps=30, regroup_every=0, affinity_steps=25, condition_every=5,
                                                **options))
    for step in range(60):
        a, b, c = torch.rand(8), torch.rand(8), torch.rand(8)
        per_sample = {"car.heatmap": a + 0.1, "car.size": 2 * a + 0.1, "ped.heatmap": b + 0.1, "ped.size": b + 0.2,
                      "vel": c + 0.1}  # fmt: skip
        decay = {n: math.exp(-step / (40.0 if n != "vel" else 400.0)) for n in names}
        per_sample = {n: v * decay[n] for n, v in per_sample.items()}
        engine({n: v.mean() for n, v in per_sample.items()}, per_sample)
        engine.step()
    return json.loads(json.dumps(engine.summary()))  # as read back from a run's loss_engine.json


def test_loss_engine_figure_from_a_real_engine(tmp_path):
    summary = _engine_summary()
    order, sizes = loss_engine.set_order(summary["task_names"], summary["task_sets"])
    assert sorted(order) == list(range(5)) and sum(sizes) == 5 and len(sizes) == len(summary["task_sets"])
    segments = loss_engine.weight_segments(summary)
    assert segments[-1]["weights"].shape[1] == len(summary["task_sets"])
    assert segments[-1]["sets"] == summary["task_sets"]
    fig = loss_engine.plot_loss_engine(summary, title="toy")
    affinity_ax = fig.axes[0]
    shown = [t.get_text() for t in affinity_ax.get_xticklabels()]
    assert shown == [loss_engine.short_task_name(summary["task_names"][i]) for i in order]  # grouped set by set
    assert loss_engine.short_task_name("car+truck+bus+trailer+construction_vehicle.size") == "car+4.size"
    assert len(affinity_ax.patches) == len(sizes)  # one outline per set
    from bevperc.viz import save_figure

    assert save_figure(fig, tmp_path / "engine.png").stat().st_size > 10_000


def test_loss_engine_figure_draws_the_learnability_gates(tmp_path):
    summary = _engine_summary(first_weighting="fixed_lag", first_weight_temperature=1.0)
    last = summary["weight_history"][-1]
    assert len(last["set_gates"]) == len(summary["task_sets"]) and len(last["task_gates"]) == 5
    fig = loss_engine.plot_loss_engine(summary)
    titles = [ax.get_title() for ax in fig.axes]
    assert any("gate per task set" in t for t in titles) and any("gate per task (" in t for t in titles)
    task_ax = next(ax for ax in fig.axes if "gate per task (" in ax.get_title())
    order, _ = loss_engine.set_order(summary["task_names"], summary["task_sets"])
    image = task_ax.get_images()[0].get_array()
    assert image.shape == (5, sum("task_gates" in e for e in summary["weight_history"]))
    np.testing.assert_allclose(image[:, -1], np.array(last["task_gates"])[order])  # rows set by set
    old = {**summary, "weight_history": [{"step": e["step"], "weights": e["weights"]} for e in summary["weight_history"]]}
    assert not any("gate" in ax.get_title() for ax in loss_engine.plot_loss_engine(old).axes)  # older runs: no row
    fixed = _engine_summary(condition="fixed", first_weighting="fixed_lag", first_weight_temperature=1.0)
    titles = [ax.get_title() for ax in loss_engine.plot_loss_engine(fixed).axes]  # task gates only
    assert "set gates: not recorded" in " ".join(titles) and any("gate per task (" in t for t in titles)


def test_gesture_figures_with_real_centernet_models(tmp_path):
    import torch

    from bevperc.gesture.presets import student_config, teacher1_config
    from bevperc.models.centernet import CenterNet, decode_centernet
    from bevperc.viz.gestures import heatmap_agreement, plot_gesture_detections, plot_student_teacher_heatmaps

    torch.manual_seed(0)
    classes = ["like", "palm", "peace"]
    student, teacher = CenterNet(student_config(), 3).eval(), CenterNet(teacher1_config(), 3).eval()
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out_s, out_t = student(image), teacher(image)
    detections = decode_centernet(out_s.heatmap, out_s.wh, out_s.offset, student.output_stride, score_threshold=0.0)
    uint8 = (image[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    gt = [{"boxes": np.array([[10.0, 12.0, 30.0, 40.0]]), "labels": np.array([1])}]
    fig = plot_gesture_detections([uint8], detections, classes, gt, score_threshold=0.0)
    assert len(fig.axes[0].patches) == 1 + len(detections[0]["boxes"])
    fig = plot_student_teacher_heatmaps(uint8, {"student": out_s.heatmap, "teacher 1": out_t.heatmap}, classes, logits=True)
    assert len(fig.axes) >= 3 * 3  # 3 class rows x (image + 2 models), plus the colour bar
    assert heatmap_agreement(out_s.heatmap, out_s.heatmap, logits=True) == 0.0


# --------------------------------------------------------------------------- training curves
def _lines(ax) -> dict:
    return {line.get_gid(): line for line in ax.get_lines() if line.get_gid()}


def test_training_curves_put_each_value_at_its_step():
    from bevperc.viz.training import moving_average, plot_training_curves

    loss = [10.0 - 0.2 * i for i in range(40)]
    loss[4] = float("nan")  # a skipped step
    lr = [1e-3 * (i + 1) / 40 for i in range(40)]
    history = {"loss": loss, "lr": lr, "grad_norm": [1.0] * 40, "skipped_steps": [5],
               "val": [{"epoch": 0, "mAP": 0.1, "NDS": 0.2},                 # older entry: no step -> (0+1)*10
                       {"epoch": 2, "step": 30, "mAP": 0.3, "NDS": 0.35},
                       {"epoch": 3, "step": 40, "mAP": 0.25, "NDS": 0.4, "note": "text is not drawn"}]}
    fig = plot_training_curves(history, steps_per_epoch=10)
    ax_loss, ax_lr, ax_val = fig.axes
    assert [ax.get_title().split(" (")[0] for ax in fig.axes] == ["training loss", "learning rate",
                                                                  "validation after epochs"]
    assert all(ax.get_xlabel() == "step" for ax in fig.axes)
    lines = _lines(ax_loss)
    np.testing.assert_array_equal(lines["loss"].get_xdata(), np.arange(1, 41))  # loss[i] is step i + 1
    np.testing.assert_array_equal(lines["loss"].get_ydata(), np.asarray(loss))
    np.testing.assert_allclose(lines["loss_average"].get_ydata(), moving_average(loss, 2))  # 40 // 20 steps
    assert np.isfinite(lines["loss_average"].get_ydata()).all()  # the NaN step is left out, not spread
    np.testing.assert_array_equal(lines["skipped_steps"].get_xdata(), [5])
    np.testing.assert_allclose(_lines(ax_lr)["lr"].get_ydata(), lr)
    val = _lines(ax_val)
    assert sorted(val) == ["val/NDS", "val/mAP"]
    np.testing.assert_array_equal(val["val/mAP"].get_xdata(), [10, 30, 40])
    np.testing.assert_allclose(val["val/mAP"].get_ydata(), [0.1, 0.3, 0.25])
    np.testing.assert_allclose(val["val/NDS"].get_ydata(), [0.2, 0.35, 0.4])
    assert ax_val.get_xlim() == ax_loss.get_xlim()
    assert "4 epochs of 10 steps" in fig._suptitle.get_text()

    # trailing and centred averages, NaN ignored
    np.testing.assert_allclose(moving_average([1.0, 2.0, 3.0, 4.0, 5.0], 3), [1.5, 2.0, 3.0, 4.0, 4.5])
    np.testing.assert_allclose(moving_average([1.0, float("nan"), 3.0], 2, center=False), [1.0, 1.0, 3.0])

    empty = plot_training_curves({**history, "val": []})
    assert not [gid for gid in _lines(empty.axes[2]) if gid.startswith("val/")]
    assert any("no in-training validation" in text.get_text() for text in empty.axes[2].texts)


def test_training_curves_from_a_trainer_checkpoint_and_the_cli(tmp_path):
    """A real (toy) Trainer run with validation: the checkpoint's history -> figure -> training_curves.png."""
    import torch
    from helpers.toy_train import build_trainer, parse_args

    from bevperc.training.checkpoint import load_checkpoint
    from bevperc.training.logging import close_logger
    from bevperc.viz.__main__ import main as viz_main
    from bevperc.viz.training import history_from_checkpoint, plot_training_curves

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer, _, _ = build_trainer(parse_args(["--work-dir", str(tmp_path / "run"), "--no-tensorboard",
                                                  "--epochs", "2", "--samples", "24", "--validate"]))
        trainer.fit()
    finally:
        close_logger()
        torch.set_num_threads(threads)
    checkpoint = tmp_path / "run" / "checkpoints" / "latest.pth"
    history = history_from_checkpoint(load_checkpoint(checkpoint))
    per_epoch = trainer.iters_per_epoch
    assert history["steps_per_epoch"] == per_epoch and len(history["loss"]) == 2 * per_epoch
    assert [entry["step"] for entry in history["val"]] == [per_epoch, 2 * per_epoch]
    val = _lines(plot_training_curves(history).axes[2])
    assert sorted(val) == ["val/accuracy", "val/mse"]
    np.testing.assert_array_equal(val["val/mse"].get_xdata(), [per_epoch, 2 * per_epoch])
    np.testing.assert_allclose(val["val/mse"].get_ydata(), [entry["mse"] for entry in history["val"]])

    result = subprocess.run(
        [sys.executable, "-m", "bevperc.viz", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "figures"),
         "--dpi", "50"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["training_curves.png"]
    assert "training_curves:" in result.stdout
    assert (tmp_path / "figures" / "training_curves.png").stat().st_size > 10_000

    torch.save({"model": {}}, tmp_path / "bare.pth")  # weights only, no history: nothing to draw
    with pytest.raises(SystemExit, match="no training history"):
        viz_main(["--checkpoint", str(tmp_path / "bare.pth"), "--out", str(tmp_path / "bare")])


# --------------------------------------------------------------------------- CLI
@pytest.mark.slow  # two subprocesses importing torch + a detector forward: ~20 s CPU, more wall time here
def test_cli_writes_the_figures_of_one_sample(demo_root, tmp_path):
    """The form scripts/demo.sh uses: the repo config plus section.field=value overrides."""
    import torch

    from bevperc.config import load_run_config
    from bevperc.models import build_detector
    from bevperc.viz.demo import DEMO_CONFIG, NuScenesWorld

    overrides = NuScenesWorld(demo_root).overrides()
    torch.manual_seed(0)
    model = build_detector(load_run_config(DEMO_CONFIG, overrides).model)
    torch.save({"model": model.state_dict()}, tmp_path / "model.pth")
    token = json.loads((demo_root / "bevperc_infos_mini_val.json").read_text())["samples"][1]["token"]
    result = subprocess.run(
        [sys.executable, "-m", "bevperc.viz", "--config", str(DEMO_CONFIG), "--checkpoint", str(tmp_path / "model.pth"),
         "--sample", token, "--out", str(tmp_path / "figures"), "--no-3d", "--dpi", "50", *overrides],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    written = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert written == ["bev.png", "cameras.png", "depth_CAM_FRONT.png", "heatmaps.png"]
    assert f"sample {token}" not in result.stderr  # no warnings about the sample
    bad = subprocess.run(
        [sys.executable, "-m", "bevperc.viz", "--config", str(DEMO_CONFIG), "--sample", "nope", "--out", str(tmp_path),
         *overrides],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert bad.returncode != 0 and "nope" in bad.stderr
