"""Acceptance tests of the synthetic nuScenes world: the REAL devkit loads and evaluates it."""

from __future__ import annotations

import colorsys
import copy
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bevperc import synthetic as sn
from bevperc.data.classes import DETECTION_CLASSES
from bevperc.geometry import (
    box_corners,
    invert_transform,
    make_transform,
    points_in_boxes,
    project_to_image,
    quaternion_to_yaw,
)

VERSION = "v1.0-mini"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    """The 10 mini scenes, 3 keyframes each, images (rendered at 0.2 scale) and LiDAR."""
    root = tmp_path_factory.mktemp("synthetic") / "nuscenes"
    sn.generate(root, version=VERSION, seed=0, samples_per_scene=3, render_scale=0.2, workers=2, progress=False)
    return root


@pytest.fixture(scope="module")
def nusc(small_root):
    from nuscenes.nuscenes import NuScenes

    return NuScenes(VERSION, str(small_root), verbose=False)


def _walk(nusc, table: str, first: str) -> list[dict]:
    records, token = [], first
    while token:
        record = nusc.get(table, token)
        records.append(record)
        token = record["next"]
    return records


# --------------------------------------------------------------------------- tables and links
def test_devkit_loads_with_consistent_tokens_and_links(nusc, small_root):
    from nuscenes.utils import splits

    assert sorted(s["name"] for s in nusc.scene) == sorted(splits.mini_train + splits.mini_val)
    for scene in nusc.scene:
        samples = _walk(nusc, "sample", scene["first_sample_token"])
        assert len(samples) == scene["nbr_samples"] == 3
        assert samples[-1]["token"] == scene["last_sample_token"]
        assert samples[0]["prev"] == ""
        for a, b in zip(samples, samples[1:]):
            assert b["prev"] == a["token"]
            assert b["timestamp"] - a["timestamp"] == 500_000  # keyframes at 2 Hz
        assert all(s["scene_token"] == scene["token"] for s in samples)
    for sample in nusc.sample:
        assert set(sample["data"]) == set(sn.CAMERA_NAMES) | {"LIDAR_TOP"}
        for channel, sd_token in sample["data"].items():
            sd = nusc.get("sample_data", sd_token)
            assert sd["is_key_frame"] and sd["sample_token"] == sample["token"]
            nusc.get("ego_pose", sd["ego_pose_token"])
            calib = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
            assert nusc.get("sensor", calib["sensor_token"])["channel"] == channel
            assert (small_root / sd["filename"]).is_file()
            if channel != "LIDAR_TOP":
                assert (sd["width"], sd["height"]) == (1600, 900)
                assert len(calib["camera_intrinsic"]) == 3
    # sample_data chains per channel: prev/next symmetric, timestamps increasing
    for sd in nusc.sample_data:
        if sd["next"]:
            nxt = nusc.get("sample_data", sd["next"])
            assert nxt["prev"] == sd["token"] and nxt["channel"] == sd["channel"]
            assert nxt["timestamp"] > sd["timestamp"]
    # instances: first -> last walk covers nbr_annotations consecutive samples
    for inst in nusc.instance:
        anns = _walk(nusc, "sample_annotation", inst["first_annotation_token"])
        assert len(anns) == inst["nbr_annotations"] >= 1
        assert anns[-1]["token"] == inst["last_annotation_token"]
        assert all(a["instance_token"] == inst["token"] for a in anns)
        for a, b in zip(anns, anns[1:]):
            assert b["prev"] == a["token"]
            assert nusc.get("sample", a["sample_token"])["next"] == b["sample_token"]
    # annotation fields
    attribute_names = {a["token"]: a["name"] for a in nusc.attribute}
    for ann in nusc.sample_annotation:
        assert ann["visibility_token"] in {"1", "2", "3", "4"}
        assert ann["num_lidar_pts"] >= 0 and ann["num_radar_pts"] == 0
        assert len(ann["size"]) == 3 and min(ann["size"]) > 0
        category = ann["category_name"]
        attrs = [attribute_names[t] for t in ann["attribute_tokens"]]
        if category in ("vehicle.bicycle", "vehicle.motorcycle"):
            assert len(attrs) == 1 and attrs[0].startswith("cycle.")
        elif category.startswith("vehicle."):
            assert len(attrs) == 1 and attrs[0].startswith("vehicle.")
        elif category.startswith("human.pedestrian"):
            assert len(attrs) == 1 and attrs[0].startswith("pedestrian.")
        else:
            assert attrs == []


def test_every_detection_class_and_moving_objects_present(nusc):
    from nuscenes.eval.detection.utils import category_to_detection_name

    names = {category_to_detection_name(a["category_name"]) for a in nusc.sample_annotation}
    assert set(DETECTION_CLASSES) <= names
    speeds = [np.linalg.norm(nusc.box_velocity(a["token"])[:2]) for a in nusc.sample_annotation[::7]]
    speeds = np.nan_to_num(np.array(speeds))
    assert (speeds > 1.0).sum() > 20 and (speeds < 0.1).sum() > 20  # moving and parked objects


def test_dataset_info_and_existing_output_errors(small_root, tmp_path):
    info = json.loads((small_root / "dataset_info.json").read_text())
    assert info["seed"] == 0 and info["version"] == VERSION
    assert info["generator_version"] == sn.GENERATOR_VERSION
    assert info["options"]["samples_per_scene"] == 3
    out = tmp_path / "occupied"
    out.mkdir()
    (out / "something.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        sn.generate(out, num_scenes=1, samples_per_scene=2, images=False, lidar=False, progress=False)
    # the CLI turns it into a clear message and exit status 2
    spec = importlib.util.spec_from_file_location("synthetic_cli", REPO / "data_tools" / "synthetic_nuscenes.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--out", str(out), "--num-scenes", "1", "--samples-per-scene", "2", "--tables-only",
                     "--quiet"]) == 2
    assert cli.main(["--out", str(out), "--num-scenes", "1", "--samples-per-scene", "2", "--tables-only",
                     "--quiet", "--overwrite"]) == 0
    assert (out / VERSION / "sample.json").is_file() and (out / "something.txt").is_file()
    with pytest.raises(TypeError, match="unknown option"):
        sn.generate(tmp_path / "x", samples_per_scen=2)


# --------------------------------------------------------------------------- devkit evaluation
def _gt_submission(nusc, shift_x: float = 0.0) -> dict:
    from nuscenes.eval.detection.utils import category_to_detection_name
    from nuscenes.utils import splits

    val_scenes = set(splits.mini_val)
    attribute_names = {a["token"]: a["name"] for a in nusc.attribute}
    results = {}
    for sample in nusc.sample:
        if nusc.get("scene", sample["scene_token"])["name"] not in val_scenes:
            continue
        boxes = []
        for ann_token in sample["anns"]:
            ann = nusc.get("sample_annotation", ann_token)
            name = category_to_detection_name(ann["category_name"])
            if name is None or ann["num_lidar_pts"] + ann["num_radar_pts"] == 0:
                continue  # the evaluation drops such GT, so a perfect submission has none either
            velocity = np.nan_to_num(nusc.box_velocity(ann_token)[:2])
            attrs = [attribute_names[t] for t in ann["attribute_tokens"]]
            boxes.append({
                "sample_token": sample["token"],
                "translation": [ann["translation"][0] + shift_x, ann["translation"][1], ann["translation"][2]],
                "size": ann["size"], "rotation": ann["rotation"], "velocity": velocity.tolist(),
                "detection_name": name, "detection_score": 1.0, "attribute_name": attrs[0] if attrs else "",
            })
        results[sample["token"]] = boxes
    meta = {"use_camera": True, "use_lidar": False, "use_radar": False, "use_map": False, "use_external": False}
    return {"meta": meta, "results": results}


def _evaluate(nusc, submission: dict, out_dir: Path) -> dict:
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval

    out_dir.mkdir(parents=True, exist_ok=True)
    result_path = out_dir / "results.json"
    result_path.write_text(json.dumps(submission))
    evaluator = DetectionEval(nusc, config=config_factory("detection_cvpr_2019"), result_path=str(result_path),
                              eval_set="mini_val", output_dir=str(out_dir), verbose=False)
    return evaluator.main(plot_examples=0, render_curves=False)


def test_devkit_detection_eval_of_ground_truth(nusc, tmp_path):
    submission = _gt_submission(nusc)
    n_boxes = {name: 0 for name in DETECTION_CLASSES}
    for boxes in submission["results"].values():
        for box in boxes:
            n_boxes[box["detection_name"]] += 1
    assert all(n > 0 for n in n_boxes.values()), n_boxes  # every class is in mini_val
    metrics = _evaluate(nusc, submission, tmp_path / "exact")
    assert metrics["mean_ap"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["tp_errors"]["trans_err"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["tp_errors"]["scale_err"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["tp_errors"]["orient_err"] == pytest.approx(0.0, abs=1e-6)
    shifted = _evaluate(nusc, _gt_submission(nusc, shift_x=1.0), tmp_path / "shifted")
    assert shifted["tp_errors"]["trans_err"] == pytest.approx(1.0, abs=0.05)
    assert shifted["mean_ap"] < 1.0


# --------------------------------------------------------------------------- geometry and rendering
def _boxes_in_camera(nusc, cam_token: str) -> list[tuple[dict, np.ndarray, np.ndarray]]:
    """(annotation, corners_camera (8, 3), centre_camera (3,)) per annotation, via bevperc.geometry."""
    sd = nusc.get("sample_data", cam_token)
    pose = nusc.get("ego_pose", sd["ego_pose_token"])
    calib = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
    global_from_ego = make_transform(np.array(pose["rotation"]), np.array(pose["translation"]))
    ego_from_cam = make_transform(np.array(calib["rotation"]), np.array(calib["translation"]))
    cam_from_global = invert_transform(global_from_ego @ ego_from_cam)
    out = []
    for ann_token in nusc.get("sample", sd["sample_token"])["anns"]:
        ann = nusc.get("sample_annotation", ann_token)
        w, l, h = ann["size"]
        box = np.array([[*ann["translation"], w, l, h, quaternion_to_yaw(ann["rotation"])]])
        corners = box_corners(box)[0] @ cam_from_global[:3, :3].T + cam_from_global[:3, 3]
        centre = cam_from_global[:3, :3] @ np.array(ann["translation"]) + cam_from_global[:3, 3]
        out.append((ann, corners, centre))
    return out


def test_projection_agrees_with_devkit(nusc):
    from nuscenes.utils.geometry_utils import BoxVisibility, view_points

    checked = 0
    for sample in nusc.sample[::4]:
        for cam in sn.CAMERA_NAMES:
            cam_token = sample["data"][cam]
            _, dev_boxes, dev_k = nusc.get_sample_data(cam_token, box_vis_level=BoxVisibility.ANY)
            ours = {ann["token"]: (corners, centre) for ann, corners, centre in _boxes_in_camera(nusc, cam_token)}
            intrinsics = np.array(nusc.get("calibrated_sensor", nusc.get("sample_data", cam_token)[
                "calibrated_sensor_token"])["camera_intrinsic"])
            np.testing.assert_allclose(intrinsics, dev_k)
            for box in dev_boxes:
                corners, _ = ours[box.token]
                dev_corners = box.corners()  # (3, 8)
                np.testing.assert_allclose(corners, dev_corners.T, atol=1e-6)
                front = dev_corners[2] > 1.0
                if not front.any():
                    continue
                dev_pix = view_points(dev_corners, dev_k, normalize=True)[:2].T
                our_pix, _ = project_to_image(corners, intrinsics)
                assert np.abs(our_pix[front] - dev_pix[front]).max() < 1.0
                checked += 1
    assert checked > 50


def _hue_deg(rgb: np.ndarray) -> np.ndarray:
    return np.array([colorsys.rgb_to_hsv(*(c / 255.0))[0] * 360.0 for c in rgb])


def _sat(rgb: np.ndarray) -> np.ndarray:
    mx, mn = rgb.max(1), rgb.min(1)
    return (mx - mn) / np.maximum(mx, 1e-6)


CLASS_HUES = {name: float(_hue_deg(np.array([sn.CLASS_COLOURS[name]], dtype=np.float64))[0])
              for name in DETECTION_CLASSES}


def _nearest_class_by_hue(hue: float) -> str:
    return min(CLASS_HUES, key=lambda n: abs((hue - CLASS_HUES[n] + 180) % 360 - 180))


def test_projected_centres_land_on_objects_of_their_class_colour(nusc, small_root):
    from nuscenes.eval.detection.utils import category_to_detection_name

    results = []
    for sample in nusc.sample:
        for cam in sn.CAMERA_NAMES:
            cam_token = sample["data"][cam]
            k = np.array(nusc.get("calibrated_sensor", nusc.get("sample_data", cam_token)[
                "calibrated_sensor_token"])["camera_intrinsic"])
            boxes = _boxes_in_camera(nusc, cam_token)
            image = None
            for ann, corners, centre in boxes:
                name = category_to_detection_name(ann["category_name"])
                if name is None or ann["visibility_token"] != "4" or not 4.0 < centre[2] < 25.0:
                    continue
                pix, _ = project_to_image(centre[None], k)
                u, v = float(pix[0, 0]), float(pix[0, 1])
                if not (20 <= u < 1580 and 20 <= v < 880):
                    continue
                # skip centres behind another annotated box's projected rectangle that is nearer
                occluded = False
                for other, other_corners, other_centre in boxes:
                    if other is ann or (other_corners[:, 2] <= 0.1).any() or other_centre[2] >= centre[2]:
                        continue
                    pix, _ = project_to_image(other_corners, k)
                    if pix[:, 0].min() <= u <= pix[:, 0].max() and pix[:, 1].min() <= v <= pix[:, 1].max():
                        occluded = True
                        break
                if occluded:
                    continue
                if image is None:
                    image = np.asarray(Image.open(small_root / nusc.get("sample_data", cam_token)["filename"]),
                                       dtype=np.float64)
                patch = image[int(v) - 3: int(v) + 4, int(u) - 3: int(u) + 4].reshape(-1, 3)
                saturated = patch[_sat(patch) > 0.25]
                if len(saturated) < len(patch) // 3:
                    results.append((name, None))
                    continue
                hue = float(np.median(_hue_deg(saturated)))  # class hues avoid the 0/360 wrap except bus
                if name == "bus":
                    hues = _hue_deg(saturated)
                    hue = float(np.degrees(np.angle(np.exp(1j * np.radians(hues)).mean())) % 360)
                results.append((name, _nearest_class_by_hue(hue)))
    assert len(results) >= 40, len(results)
    correct = sum(found == name for name, found in results)
    assert correct / len(results) >= 0.9, [r for r in results if r[0] != r[1]][:20]


def test_lidar_points_and_counts(nusc, small_root):
    ego_from_lidar = sn.ego_from_lidar()
    for sample in nusc.sample[::5]:
        sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        points = np.fromfile(small_root / sd["filename"], dtype=np.float32).reshape(-1, 5)
        assert 10_000 < len(points) <= 32 * sn.LIDAR_AZIMUTH_STEPS
        assert set(np.unique(points[:, 4]).astype(int)) <= set(range(32))
        assert np.all((points[:, 3] >= 0) & (points[:, 3] <= 255))
        points_ego = points[:, :3].astype(np.float64) @ ego_from_lidar[:3, :3].T + ego_from_lidar[:3, 3]
        assert np.linalg.norm(points_ego[:, :2], axis=1).max() <= sn.LIDAR_MAX_RANGE + 1.0
        assert np.mean(np.abs(points_ego[:, 2]) < 0.1) > 0.4  # most returns are the ground at z = 0
        pose = nusc.get("ego_pose", sd["ego_pose_token"])
        ego_from_global = invert_transform(make_transform(np.array(pose["rotation"]), np.array(pose["translation"])))
        for ann_token in sample["anns"]:
            ann = nusc.get("sample_annotation", ann_token)
            centre = ego_from_global[:3, :3] @ np.array(ann["translation"]) + ego_from_global[:3, 3]
            yaw = quaternion_to_yaw(ann["rotation"]) + math.atan2(ego_from_global[1, 0], ego_from_global[0, 0])
            box = np.array([[*centre, *ann["size"], yaw]])
            assert points_in_boxes(points_ego, box).sum() == ann["num_lidar_pts"]


def test_visible_near_boxes_have_points_and_tables_only_estimate_tracks_raycast(nusc, tmp_path):
    for ann in nusc.sample_annotation:
        sample = nusc.get("sample", ann["sample_token"])
        pose = nusc.get("ego_pose", nusc.get("sample_data", sample["data"]["LIDAR_TOP"])["ego_pose_token"])
        dist = math.hypot(ann["translation"][0] - pose["translation"][0], ann["translation"][1] - pose["translation"][1])
        if ann["visibility_token"] == "4" and dist < 30.0:
            assert ann["num_lidar_pts"] > 0
    # the same worlds without sensors: same boxes, estimated counts correlate with ray cast ones
    options = dict(seed=0, num_scenes=2, samples_per_scene=3, progress=False, workers=1)
    sensed = sn.generate(tmp_path / "sensed", images=True, lidar=True, render_scale=0.15, **options)
    estimated = sn.generate(tmp_path / "estimated", images=False, lidar=False, **options)
    a = json.loads((sensed / VERSION / "sample_annotation.json").read_text())
    b = json.loads((estimated / VERSION / "sample_annotation.json").read_text())
    assert [x["token"] for x in a] == [x["token"] for x in b]
    assert [x["translation"] for x in a] == [x["translation"] for x in b]
    real = np.array([x["num_lidar_pts"] for x in a], dtype=float)
    approx = np.array([x["num_lidar_pts"] for x in b], dtype=float)
    assert np.all(approx[(real > 0)] >= 0)
    order_real, order_approx = np.argsort(np.argsort(real)), np.argsort(np.argsort(approx))
    spearman = np.corrcoef(order_real, order_approx)[0, 1]
    assert spearman > 0.6, spearman
    vis_a = np.array([int(x["visibility_token"]) for x in a])
    vis_b = np.array([int(x["visibility_token"]) for x in b])
    assert np.mean(np.abs(vis_a - vis_b) <= 1) > 0.7


# --------------------------------------------------------------------------- determinism
def _file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_identical_different_seed_different(tmp_path):
    options = dict(num_scenes=2, samples_per_scene=2, render_scale=0.12, progress=False)
    first = _file_bytes(sn.generate(tmp_path / "a", seed=3, workers=1, **options))
    second = _file_bytes(sn.generate(tmp_path / "b", seed=3, workers=2, **options))  # workers do not matter
    assert first.keys() == second.keys()
    assert any(k.endswith(".jpg") for k in first) and any(k.endswith(".pcd.bin") for k in first)
    for key in first:
        assert first[key] == second[key], key
    other = _file_bytes(sn.generate(tmp_path / "c", seed=4, images=False, lidar=False, **options))
    assert other[f"{VERSION}/sample_annotation.json"] != first[f"{VERSION}/sample_annotation.json"]
    assert other[f"{VERSION}/scene.json"] != first[f"{VERSION}/scene.json"]


def test_trainval_tables_only_uses_real_val_scene_names(tmp_path):
    from nuscenes.nuscenes import NuScenes
    from nuscenes.utils import splits

    root = sn.generate(tmp_path / "tv", version="v1.0-trainval", num_scenes=3, samples_per_scene=4,
                       images=False, lidar=False, progress=False)
    nusc = NuScenes("v1.0-trainval", str(root), verbose=False)
    assert [s["name"] for s in nusc.scene] == splits.val[:3]
    assert len(nusc.sample) == 12
    assert not (root / "samples").exists()
    n_ann = len(nusc.sample_annotation) / len(nusc.sample)
    assert 20 < n_ann < 120


def test_split_option_generates_a_held_out_val_world_the_devkit_evaluates(tmp_path):
    """``split="mini_val"`` with another seed: only the val scenes, loadable and scorable by the devkit."""
    from nuscenes.eval.common.loaders import load_gt
    from nuscenes.eval.detection.data_classes import DetectionBox
    from nuscenes.nuscenes import NuScenes
    from nuscenes.utils import splits

    root = sn.generate(tmp_path / "heldout", seed=1, split="mini_val", samples_per_scene=3,
                       images=False, lidar=False, progress=False)
    nusc = NuScenes(VERSION, str(root), verbose=False)
    assert [s["name"] for s in nusc.scene] == splits.mini_val
    gt = load_gt(nusc, "mini_val", DetectionBox, verbose=False)
    assert len(gt.sample_tokens) == 3 * len(splits.mini_val)
    with pytest.raises(ValueError, match="split must be one of"):
        sn.generate(tmp_path / "bad", split="val", images=False, lidar=False, progress=False)
    for option, message in ((dict(render_scale=0.01), "render_scale"), (dict(jpeg_quality=0), "jpeg_quality"),
                            (dict(objects_per_sample=-1.0), "objects_per_sample")):
        with pytest.raises(ValueError, match=message):
            sn.generate(tmp_path / "bad", progress=False, **option)
    assert not (tmp_path / "bad").exists()  # checked before anything is written


def test_world_geometry_is_consistent():
    """Road curvilinear coordinates invert, objects stand on the ground and do not overlap the ego."""
    cfg = sn.SyntheticConfig()
    for index, name in enumerate(["scene-0061", "scene-0103", "scene-0916"]):
        world = sn.build_world(cfg, name, index, duration=19.5)
        s = np.linspace(-50, 150, 7)
        lateral = np.linspace(-20, 20, 7)
        s_back, lat_back = world.road.curvilinear(world.road.point(s, lateral))
        np.testing.assert_allclose(s_back, s, atol=1e-6)
        np.testing.assert_allclose(lat_back, lateral, atol=1e-6)
        for t in (0.0, 9.5, 19.5):
            boxes = world.instance_boxes(t)
            np.testing.assert_allclose(boxes[:, 2], boxes[:, 5] / 2)  # standing on z = 0
            ego = world.ego_pose(t)
            local = boxes[:, :2] - ego[:2, 3]
            assert np.min(np.hypot(local[:, 0], local[:, 1])) > 1.5
        assert copy.deepcopy(world.instances[0]).kind in sn.OBJECT_KINDS


def test_old_module_path_is_an_alias():
    """``bevperc.data.synthetic_nuscenes`` (the world's old home) still exports its names, as the package's objects."""
    from bevperc.data import synthetic_nuscenes as old
    from bevperc.synthetic import render, tables

    assert old.generate is sn.generate and old.build_world is sn.build_world and old.SyntheticConfig is sn.SyntheticConfig
    assert old.render_camera is render.render_camera and old.CAMERA_NAMES is sn.CAMERA_NAMES
    assert tables.write_tables is sn.write_tables


def test_jpeg_encoding_is_the_bilinear_upscale_of_the_rendered_rgb_image():
    """``encode_jpeg`` swaps the channels before the resize (fast); the bytes are those of resizing the RGB
    render to 1600x900 and encoding it, and the JPEG decodes to that image."""
    import io

    import cv2

    from bevperc.synthetic.render import encode_jpeg

    rng = np.random.default_rng(0)
    small = cv2.GaussianBlur((rng.random((225, 400, 3)) * 255).astype(np.uint8), (5, 5), 2)
    small[:, :200, 0] = 255  # channels that differ: a swapped order would show
    full_rgb = cv2.resize(small, (1600, 900), interpolation=cv2.INTER_LINEAR)
    ok, reference = cv2.imencode(".jpg", np.ascontiguousarray(full_rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    encoded = encode_jpeg(small, 90)
    assert encoded == reference.tobytes()
    decoded = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB")).astype(int)
    assert decoded.shape == (900, 1600, 3) and np.abs(decoded - full_rgb).mean() < 3
