"""Info files and the multi-camera dataset: geometry stays exact under augmentation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial import cKDTree

from bevperc.data import DataConfig, DataError, NuScenesBEVDataset, collate_bev, create_infos, load_infos
from bevperc.data.config import ImageAugConfig
from bevperc.data.dataset import load_lidar_points
from bevperc.data.infos import CAMERA_NAMES
from bevperc.geometry import invert_transform, transform_boxes, transform_points
from bevperc.models.config import BEVGridConfig


def make_cfg(root: Path, **kwargs) -> DataConfig:
    """A data config used on its own: it sets the model's values a run config fills in."""
    return DataConfig(**{"dataroot": str(root), "input_size": (128, 352), "gt_range": BEVGridConfig().bounds, **kwargs})


def denormalise(images: torch.Tensor, cfg: DataConfig) -> np.ndarray:
    """[N, 3, H, W] normalised -> [N, H, W, 3] float RGB in 0..255."""
    mean = torch.tensor(cfg.image_mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg.image_std).view(1, 3, 1, 1) * 255
    return (images * std + mean).permute(0, 2, 3, 1).numpy()


def test_infos_agree_with_devkit(synthetic_root, synthetic_infos):
    from nuscenes.eval.detection.utils import category_to_detection_name
    from nuscenes.nuscenes import NuScenes
    from nuscenes.utils.splits import create_splits_scenes

    nusc = NuScenes("v1.0-mini", str(synthetic_root), verbose=False)
    val_scenes = set(create_splits_scenes()["mini_val"])
    expected_tokens = [s["token"] for s in nusc.sample if nusc.get("scene", s["scene_token"])["name"] in val_scenes]
    infos = load_infos(synthetic_infos["mini_val"])
    assert sorted(s["token"] for s in infos["samples"]) == sorted(expected_tokens)

    for sample in infos["samples"][:3]:
        record = nusc.get("sample", sample["token"])
        anns = [nusc.get("sample_annotation", t) for t in record["anns"]]
        anns = [a for a in anns if category_to_detection_name(a["category_name"]) is not None]
        assert len(sample["gt"]["boxes"]) == len(anns)
        boxes_global = transform_boxes(np.asarray(sample["global_from_ego"]), np.asarray(sample["gt"]["boxes"]))
        by_token = {a["token"]: a for a in anns}
        for box, token in zip(boxes_global, sample["gt"]["tokens"]):
            np.testing.assert_allclose(box[:3], by_token[token]["translation"], atol=1e-4)
            np.testing.assert_allclose(box[3:6], by_token[token]["size"], atol=1e-4)
        # cameras: ego_from_camera composes the camera's own ego pose (devkit path)
        cam_sd = nusc.get("sample_data", record["data"]["CAM_FRONT"])
        cs = nusc.get("calibrated_sensor", cam_sd["calibrated_sensor_token"])
        ego = nusc.get("ego_pose", cam_sd["ego_pose_token"])
        from pyquaternion import Quaternion

        global_from_camera = np.eye(4)
        global_from_camera[:3, :3] = Quaternion(ego["rotation"]).rotation_matrix @ Quaternion(cs["rotation"]).rotation_matrix
        global_from_camera[:3, 3] = Quaternion(ego["rotation"]).rotation_matrix @ cs["translation"] + ego["translation"]
        ours = np.asarray(sample["global_from_ego"]) @ np.asarray(sample["cameras"]["CAM_FRONT"]["ego_from_camera"])
        np.testing.assert_allclose(ours, global_from_camera, atol=1e-6)


def test_item_format_and_collate(synthetic_root, synthetic_infos):
    cfg = make_cfg(synthetic_root, load_depth=True)
    dataset = NuScenesBEVDataset(cfg, "mini_train", train=True)
    item = dataset[0]
    assert item["images"].shape == (6, 3, 128, 352) and item["images"].dtype == torch.float32
    assert item["intrinsics"].shape == (6, 3, 3)
    assert item["ego_from_camera"].shape == (6, 4, 4)
    assert item["image_aug"].shape == (6, 3, 3)
    assert item["bev_aug"].shape == (4, 4)
    assert item["gt_boxes"].shape[1] == 9 and item["gt_labels"].dtype == torch.int64
    assert item["depth_maps"].shape == (6, 128, 352)
    assert item["global_from_ego"].dtype == torch.float64
    batch = collate_bev([dataset[0], dataset[1]])
    assert batch["images"].shape[0] == 2 and isinstance(batch["gt_boxes"], list) and len(batch["sample_token"]) == 2


def test_augmentation_is_a_pure_function_of_seed_epoch_index(synthetic_root, synthetic_infos):
    dataset = NuScenesBEVDataset(make_cfg(synthetic_root), "mini_train", train=True, seed=3)
    first = dataset[2]
    again = dataset[2]
    torch.testing.assert_close(first["images"], again["images"])
    torch.testing.assert_close(first["bev_aug"], again["bev_aug"])
    dataset.set_epoch(1)
    other = dataset[2]
    assert not torch.equal(first["image_aug"], other["image_aug"])


def test_image_aug_maps_original_pixels_to_input_pixels(synthetic_root, synthetic_infos):
    """Sample input pixels, map them back through inv(image_aug): same colour in the original JPEG."""
    cfg = make_cfg(synthetic_root, image_aug=ImageAugConfig(rotate_range=(-5.0, 5.0), flip_prob=0.5))
    dataset = NuScenesBEVDataset(cfg, "mini_train", train=True, seed=1)
    rng = np.random.default_rng(0)
    for index in range(3):
        item = dataset[index]
        images = denormalise(item["images"], cfg)
        sample = dataset.samples[index]
        for cam_index, camera in enumerate(CAMERA_NAMES[:3]):
            original = np.asarray(Image.open(synthetic_root / sample["cameras"][camera]["path"]).convert("RGB"), dtype=np.float64)
            inverse = np.linalg.inv(item["image_aug"][cam_index].double().numpy())
            rows = rng.integers(8, 120, 200)
            cols = rng.integers(8, 344, 200)
            pix = np.stack([cols + 0.5, rows + 0.5, np.ones(200)], 1) @ inverse.T
            u, v = pix[:, 0].astype(int), pix[:, 1].astype(int)
            ok = (u >= 0) & (u < original.shape[1]) & (v >= 0) & (v < original.shape[0])
            diff = np.abs(images[cam_index][rows[ok], cols[ok]] - original[v[ok], u[ok]]).mean(axis=1)
            # resampling blurs edges; the bulk of pixels must agree closely
            assert np.median(diff) < 12.0, (camera, np.median(diff))


def test_bev_aug_moves_boxes_consistently(synthetic_root, synthetic_infos):
    # an unbounded GT range, so augmentation and the plain item keep the same boxes in the same order
    cfg = make_cfg(synthetic_root, gt_range=(-1e4, -1e4, -1e4, 1e4, 1e4, 1e4))
    train = NuScenesBEVDataset(cfg, "mini_train", train=True, seed=5)
    test = NuScenesBEVDataset(cfg, "mini_train", train=False)
    flips = set()
    for index in range(6):
        aug_item, plain_item = train[index], test[index]
        bev_aug = aug_item["bev_aug"].double()
        flips.add(tuple(np.sign(np.diag(bev_aug[:2, :2].numpy())).tolist()))
        back = transform_boxes(invert_transform(bev_aug), aug_item["gt_boxes"].double())
        plain = plain_item["gt_boxes"].double()
        assert len(back) == len(plain) > 0
        torch.testing.assert_close(back[:, :6], plain[:, :6], atol=1e-3, rtol=0)
        torch.testing.assert_close(torch.cos(back[:, 6] - plain[:, 6]), torch.ones(len(plain), dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(back[:, 7:], plain[:, 7:], atol=1e-3, rtol=0)
    assert len(flips) > 1  # the items exercised more than one flip combination


def test_lift_frustum_lands_on_the_gt_centre_seen_in_the_augmented_image(synthetic_root, synthetic_infos):
    """The detector's lift and the data pipeline agree on every augmentation.

    Project each GT centre (augmented ego frame) into the augmented input image the way the
    dataset defines it (camera <- ego <- bev_aug, K, image_aug); lift that pixel at that depth
    with ``frustum_to_ego``: it must land back on the centre. An inverted or misapplied
    ``image_aug``/``bev_aug`` in either place breaks this by metres.
    """
    from bevperc.models.lift import frustum_to_ego

    cfg = make_cfg(synthetic_root, image_aug=ImageAugConfig(rotate_range=(-5.0, 5.0), flip_prob=0.5))
    dataset = NuScenesBEVDataset(cfg, "mini_train", train=True, seed=3)
    input_h, input_w = cfg.input_size
    checked = 0
    for index in range(4):
        item = dataset[index]
        centres = item["gt_boxes"][:, :3].double().numpy()
        bev_aug = item["bev_aug"].double().numpy()
        for cam in range(len(CAMERA_NAMES)):
            intrinsics = item["intrinsics"][cam].double().numpy()
            ego_from_camera = item["ego_from_camera"][cam].double().numpy()
            image_aug = item["image_aug"][cam].double().numpy()
            in_camera = transform_points(invert_transform(bev_aug @ ego_from_camera), centres)
            for point, centre in zip(in_camera, centres):
                if point[2] < 1.0:
                    continue
                u, v, _ = image_aug @ np.r_[(intrinsics @ (point / point[2]))[:2], 1.0]
                if not (0 <= u < input_w and 0 <= v < input_h):
                    continue
                frustum = torch.tensor([u, v, point[2]], dtype=torch.float64).view(1, 1, 1, 3)
                lifted = frustum_to_ego(
                    frustum, item["intrinsics"][None, cam : cam + 1], item["ego_from_camera"][None, cam : cam + 1],
                    item["image_aug"][None, cam : cam + 1], item["bev_aug"][None],
                )
                np.testing.assert_allclose(lifted.reshape(3).numpy(), centre, atol=2e-3)
                checked += 1
    assert checked >= 10


def test_depth_maps_lift_back_onto_lidar_points(synthetic_root, synthetic_infos):
    """Lift depth-map pixels with the contract formula; each lands next to a LiDAR point."""
    cfg = make_cfg(synthetic_root, load_depth=True)
    dataset = NuScenesBEVDataset(cfg, "mini_train", train=True, seed=2)
    item = dataset[1]
    sample = dataset.samples[1]
    points = load_lidar_points(synthetic_root / sample["lidar"]["path"])[:, :3].astype(np.float64)
    points_aug = transform_points(item["bev_aug"].double().numpy(), transform_points(np.asarray(sample["lidar"]["ego_from_lidar"]), points))
    tree = cKDTree(points_aug)
    total = 0
    for cam in range(6):
        depth = item["depth_maps"][cam].numpy()
        rows, cols = np.nonzero(depth)
        assert len(rows) > 20
        d = depth[rows, cols].astype(np.float64)
        pix = np.stack([cols + 0.5, rows + 0.5, np.ones_like(d)], 1) @ np.linalg.inv(item["image_aug"][cam].double().numpy()).T
        cam_pts = (pix @ np.linalg.inv(item["intrinsics"][cam].double().numpy()).T) * d[:, None]
        ego_aug = transform_points(item["bev_aug"].double().numpy() @ item["ego_from_camera"][cam].double().numpy(), cam_pts)
        distance, _ = tree.query(ego_aug)
        # a pixel covers ~ depth * 1600/352 / f metres; allow that plus a margin
        tolerance = 0.05 + d * (1600 / 352) / 1266 * 1.5
        assert np.mean(distance < tolerance) > 0.95
        total += len(rows)
    assert total > 500


def test_missing_image_names_the_file(synthetic_root, synthetic_infos, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    infos = json.loads(Path(synthetic_infos["mini_val"]).read_text())
    (root / "bevperc_infos_mini_val.json").write_text(json.dumps(infos))
    # link only the LiDAR folder: every image is missing
    (root / "samples").mkdir()
    dataset = NuScenesBEVDataset(make_cfg(root), "mini_val", train=False)
    with pytest.raises(DataError, match=r"CAM_FRONT_LEFT: image file not found: .*\.jpg"):
        dataset[0]


def test_unknown_class_in_infos_names_the_field(synthetic_infos, tmp_path):
    payload = json.loads(Path(synthetic_infos["mini_val"]).read_text())
    payload["samples"][1]["gt"]["names"][0] = "spaceship"
    path = tmp_path / "bevperc_infos_mini_val.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(DataError, match=r"samples\[1\].*gt\.names.*'spaceship'"):
        load_infos(path)


def test_broken_table_names_the_file(synthetic_root, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(synthetic_root / "v1.0-mini", root / "v1.0-mini")
    table = root / "v1.0-mini" / "sample_annotation.json"
    table.write_text(table.read_text()[:-200])  # truncated JSON
    with pytest.raises(DataError, match=r"sample_annotation\.json: not valid JSON"):
        create_infos(root, "v1.0-mini", ["mini_val"], progress=False)
    records = json.loads((synthetic_root / "v1.0-mini" / "ego_pose.json").read_text())
    del records[3]["rotation"]
    table.write_text((synthetic_root / "v1.0-mini" / "sample_annotation.json").read_text())
    (root / "v1.0-mini" / "ego_pose.json").write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"ego_pose\.json: record 3 .* lacks field\(s\) \['rotation'\]"):
        create_infos(root, "v1.0-mini", ["mini_val"], progress=False)


def test_wrong_split_for_version_is_explained(synthetic_root):
    with pytest.raises(DataError, match=r"split 'val' does not belong to version 'v1.0-mini'"):
        create_infos(synthetic_root, "v1.0-mini", ["val"], progress=False)


def test_object_depth_labels_give_a_hidden_part_the_nearer_objects_depth():
    """Box A (front face 9 m) hides the left half of box B (front face 19 m) from a forward camera; road
    points lie in front of both. With foreground priority a block showing B is labelled 19 m even though
    nearer road points share it, and a block where A hides B gets A's 9 m; BEVDepth's nearest-point
    rule labels B's block with the road."""
    from bevperc.data.dataset import lidar_depth_maps
    from bevperc.models.config import ViewTransformerConfig
    from bevperc.models.lift import depth_targets

    boxes = np.array([[10.0, 1.0, 1.0, 2.0, 2.0, 2.0, 0.0, 0, 0],   # A: x 9..11, y 0..2
                      [21.0, 0.0, 1.0, 4.0, 4.0, 2.0, 0.0, 0, 0]])  # B: x 19..23, y -2..2
    grid = np.stack(np.meshgrid(np.linspace(0.02, 1.98, 25), np.linspace(0.02, 1.98, 25)), -1).reshape(-1, 2)
    face_a = np.column_stack([np.full(len(grid), 9.03), grid[:, 0], grid[:, 1]])
    face_b = np.column_stack([np.full(len(grid), 19.03), -grid[:, 0], grid[:, 1]])  # only B's visible half, y < 0
    road_x, road_y = np.meshgrid(np.arange(3.0, 19.0, 0.1), np.arange(-3.0, 3.0, 0.1))
    road = np.column_stack([road_x.ravel(), road_y.ravel(), np.zeros(road_x.size)])
    road = road[(road[:, 0] < 9.0) | (road[:, 1] < 0.0)]  # the road A hides is not seen
    points = np.concatenate([face_a, face_b, road])
    ego_from_camera = np.eye(4)
    ego_from_camera[:3, :3] = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # x right, y down, z forward
    ego_from_camera[:3, 3] = [0.0, 0.0, 1.5]
    intrinsics = np.array([[100.0, 0.0, 64.0], [0.0, 100.0, 32.0], [0.0, 0.0, 1.0]])
    maps = lidar_depth_maps(points, boxes, [ego_from_camera], [intrinsics], [np.eye(3)], (64, 128))
    depth, objects = (torch.from_numpy(maps[key])[None] for key in ("depth_maps", "object_depth_maps"))
    view = ViewTransformerConfig(input_size=(64, 128), feature_stride=16, depth_target="object")
    target, valid = depth_targets(depth, view, objects)
    nearest, _ = depth_targets(depth, ViewTransformerConfig(input_size=(64, 128), feature_stride=16))
    label = lambda t, row, col: int(t[0, 0, row, col].argmax())  # bin i covers [1 + i, 2 + i) m
    assert valid[0, 0, 2, 4] and label(target, 2, 4) == 18  # B's visible part: 19 m ...
    assert label(nearest, 2, 4) < 15  # ... where the nearest-point rule takes the road
    assert label(target, 1, 3) == label(target, 2, 3) == 8  # B's hidden part shows A: 9 m


def test_image_cache_gives_exactly_the_decoded_images(synthetic_root, synthetic_infos, tmp_path):
    plain = NuScenesBEVDataset(make_cfg(synthetic_root), "mini_train", train=True, seed=4)
    cached = NuScenesBEVDataset(make_cfg(synthetic_root, image_cache=True, cache_dir=str(tmp_path)), "mini_train",
                                train=True, seed=4)
    for index in (0, 5):
        expected = plain[index]
        first, second = cached[index], cached[index]  # the first read fills the cache, the second reads it
        assert torch.equal(first["images"], expected["images"]) and torch.equal(second["images"], expected["images"])
        torch.testing.assert_close(second["image_aug"], expected["image_aug"], rtol=0, atol=0)
    folders = list(tmp_path.iterdir())
    assert len(folders) == 1 and len(list(folders[0].glob("*.npy"))) == 12  # 2 samples x 6 cameras
    # another input size or other infos: another key, so no stale image is read
    other_size = NuScenesBEVDataset(make_cfg(synthetic_root, image_cache=True, cache_dir=str(tmp_path),
                                             input_size=(96, 256)), "mini_train", train=True)
    assert other_size.image_cache.folder != cached.image_cache.folder
    assert torch.equal(other_size[0]["images"],
                       NuScenesBEVDataset(make_cfg(synthetic_root, input_size=(96, 256)), "mini_train", train=True)[0]["images"])
