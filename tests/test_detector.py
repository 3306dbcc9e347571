"""The BEV detector: targets, encode/decode round trip, NMS, submission entries, full forward/backward."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import yaml
from nuscenes.eval.detection.data_classes import DetectionBox

from bevperc.data.classes import CLASS_INDEX, DETECTION_CLASSES
from bevperc.geometry import invert_transform, make_transform, transform_boxes
from bevperc.models import (
    BEVDetector,
    ModelConfig,
    build_detector,
    circle_nms,
    decode_detections,
    default_task_weights,
    task_names,
    to_nuscenes_detections,
)
import torchvision

from bevperc.models.backbone import build_backbone
from bevperc.models.centerpoint_head import assign_targets
from bevperc.models.heatmap import gaussian_focal_loss_sums, gaussian_radius
from bevperc.models.config import (
    BACKBONE_NAMES,
    BackboneConfig,
    BEVEncoderConfig,
    BEVGridConfig,
    DecodeConfig,
    HeadConfig,
    ImageHeadConfig,
    NeckConfig,
    ViewTransformerConfig,
)
from bevperc.models.lift import depth_loss, depth_targets, ray_features, rays_in_ego
from bevperc.utils.config import ConfigError, load_config
from helpers.geometry import bev_aug_matrix

GRID = BEVGridConfig()  # 128 x 128 cells of 0.8 m
HEAD = HeadConfig()  # the 6 standard groups


def labelled_boxes() -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes [x, y, z, w, l, h, yaw, vx, vy] of several classes, far apart (beyond every NMS radius)."""
    boxes = torch.tensor(
        [
            [10.3, 5.7, 0.9, 1.9, 4.6, 1.7, 0.4, 3.0, -1.0],  # car
            [-20.1, 12.2, 1.5, 2.5, 9.0, 3.2, -2.5, 0.0, 5.0],  # truck
            [30.0, -25.0, 1.2, 2.8, 11.0, 3.5, 2.9, -7.0, 0.5],  # bus
            [-5.5, -8.3, 0.5, 0.5, 2.0, 1.0, 1.2, 0.2, 0.1],  # barrier
            [2.2, -31.4, 0.9, 0.7, 0.8, 1.8, -1.0, 1.0, 1.0],  # pedestrian
            [-30.0, -33.0, 0.3, 0.4, 0.4, 0.8, 0.0, 0.0, 0.0],  # traffic_cone
            [0.45, 0.3, 0.8, 0.8, 2.0, 1.4, -0.3, -2.0, 0.3],  # bicycle
        ]
    )
    names = ["car", "truck", "bus", "barrier", "pedestrian", "traffic_cone", "bicycle"]
    return boxes, torch.tensor([CLASS_INDEX[n] for n in names])


# --------------------------------------------------------------------------- targets
def test_gaussian_radius_matches_centerpoint_values():
    # A car (1.9 x 4.6 m) on a 0.8 m grid, by hand: the third CornerNet case is the smallest,
    # r3 = (b3 + sqrt(b3^2 - 4 a3 c3)) / 2 with a3 = 0.4, b3 = -0.2 (5.75 + 2.375), c3 = -0.9 * 5.75 * 2.375
    b3, c3 = -0.2 * (5.75 + 2.375), -0.9 * 5.75 * 2.375
    assert gaussian_radius(4.6 / 0.8, 1.9 / 0.8, 0.1) == pytest.approx((b3 + math.sqrt(b3**2 - 1.6 * c3)) / 2)
    assert gaussian_radius(4.6 / 0.8, 1.9 / 0.8, 0.1) == pytest.approx(1.5489, abs=1e-4)  # -> min radius 2
    assert gaussian_radius(10.0, 10.0, 0.1) > gaussian_radius(5.0, 5.0, 0.1)


def test_targets_put_the_peak_at_the_centre_cell_with_correct_regressions():
    boxes, labels = labelled_boxes()
    targets = assign_targets([boxes], [labels], HEAD, GRID)
    car = targets["car"]
    ix, iy = math.floor((10.3 + 51.2) / 0.8), math.floor((5.7 + 51.2) / 0.8)
    heatmap = car.heatmap[0, 0]
    assert heatmap[iy, ix] == 1.0 and heatmap.eq(1).sum() == 1
    assert torch.nonzero(heatmap == heatmap.max()).tolist() == [[iy, ix]]
    assert heatmap[iy, ix + 2] > 0 and heatmap[iy, ix + 4] == 0  # radius 2 cells (min radius)
    assert car.mask[0].sum() == 1 and car.indices[0, 0] == iy * 128 + ix
    torch.testing.assert_close(
        car.regression["offset"][0, 0], torch.tensor([(10.3 + 51.2) / 0.8 - ix, (5.7 + 51.2) / 0.8 - iy])
    )
    torch.testing.assert_close(car.regression["height"][0, 0], torch.tensor([0.9]))
    torch.testing.assert_close(car.regression["size"][0, 0], torch.tensor([1.9, 4.6, 1.7]).log())
    torch.testing.assert_close(car.regression["rotation"][0, 0], torch.tensor([math.sin(0.4), math.cos(0.4)]))
    torch.testing.assert_close(car.regression["velocity"][0, 0], torch.tensor([3.0, -1.0]))
    # truck and bus share no group: truck in "truck+construction_vehicle" channel 0, bus in "bus+trailer" channel 0
    assert targets["truck+construction_vehicle"].heatmap[0, 0].eq(1).sum() == 1
    assert targets["truck+construction_vehicle"].heatmap[0, 1].eq(1).sum() == 0
    assert targets["bus+trailer"].heatmap[0, 0].eq(1).sum() == 1
    assert targets["pedestrian+traffic_cone"].mask[0].sum() == 2


def test_targets_skip_boxes_outside_the_grid_and_respect_max_objs():
    boxes = torch.tensor([[60.0, 0.0, 0.0, 2.0, 4.0, 1.5, 0.0, 0.0, 0.0]] + [[float(i), 0.0, 0.0, 2.0, 4.0, 1.5, 0.0, 0.0, 0.0] for i in range(5)])
    labels = torch.zeros(6, dtype=torch.long)
    head = HeadConfig(class_groups=[["car"]], max_objs=3)
    targets = assign_targets([boxes], [labels], head, GRID)["car"]
    assert targets.mask[0].tolist() == [True, True, True]
    assert targets.indices[0, 0] == 64 * 128 + 64  # x = 0 m, y = 0 m is cell (64, 64); x = 60 m was dropped


def test_focal_loss_clamps_the_probabilities_or_takes_logsigmoid():
    """CenterPoint's clamp bounds a cell's loss at -log(1e-4); without it (the gesture loss) a confident
    miss costs its whole logit. Both are CenterNet's penalty-reduced focal loss."""
    target = torch.tensor([[[[1.0, 0.5, 0.0]]]])
    logits = torch.tensor([[[[-30.0, 0.3, 30.0]]]])
    clamped, positives = gaussian_focal_loss_sums(logits, target)
    plain, _ = gaussian_focal_loss_sums(logits, target, clamp=False)
    p = torch.sigmoid(logits)
    expected = (-torch.nn.functional.logsigmoid(logits[..., 0]) * (1 - p[..., 0]) ** 2
                - torch.nn.functional.logsigmoid(-logits[..., 1:]).mul(p[..., 1:] ** 2 * (1 - target[..., 1:]) ** 4).sum(-1))
    torch.testing.assert_close(plain, expected.flatten())
    assert positives.tolist() == [1.0] and float(plain) > 60  # the two confident misses, ~30 each
    assert float(clamped) < 2 * -math.log(1e-4) + 0.1  # ~9.2 each


def naive_heatmaps(boxes: torch.Tensor, labels: torch.Tensor, head: HeadConfig, grid: BEVGridConfig) -> dict[str, torch.Tensor]:
    """Reference: one Gaussian at a time, a Python loop over objects and window slices."""
    from bevperc.models.heatmap import gaussian_kernel

    heatmaps = {}
    for group_name, group in zip(head.group_names, head.class_groups):
        heatmap = torch.zeros(len(group), grid.num_y, grid.num_x)
        for box, label in zip(boxes.tolist(), labels.tolist()):
            name = [n for n, i in CLASS_INDEX.items() if i == label][0]
            ix, iy = math.floor((box[0] - grid.x_range[0]) / grid.cell_size), math.floor((box[1] - grid.y_range[0]) / grid.cell_size)
            if name not in group or not (0 <= ix < grid.num_x and 0 <= iy < grid.num_y):
                continue
            r = max(head.min_radius, int(gaussian_radius(box[4] / grid.cell_size, box[3] / grid.cell_size, head.gaussian_overlap)))
            kernel = gaussian_kernel(r)
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    y, x = iy + dy, ix + dx
                    if 0 <= y < grid.num_y and 0 <= x < grid.num_x:
                        channel = group.index(name)
                        heatmap[channel, y, x] = max(heatmap[channel, y, x], kernel[dy + r, dx + r])
        heatmaps[group_name] = heatmap
    return heatmaps


def test_vectorised_heatmap_targets_equal_drawing_one_object_at_a_time():
    generator = torch.Generator().manual_seed(0)
    count = 60  # crowded: overlapping Gaussians, objects at the borders, sizes from cones to buses
    boxes = torch.zeros(count, 9)
    boxes[:, :2] = torch.rand(count, 2, generator=generator) * 108 - 54
    boxes[:, 3:6] = torch.rand(count, 3, generator=generator) * 10 + 0.3
    labels = torch.randint(0, 10, (count,), generator=generator)
    expected = naive_heatmaps(boxes, labels, HEAD, GRID)
    targets = assign_targets([boxes], [labels], HEAD, GRID)
    for group_name, heatmap in expected.items():
        assert torch.equal(targets[group_name].heatmap[0], heatmap), group_name
    assert sum(int(t.mask.sum()) for t in targets.values()) == sum(int((h == 1).sum()) for h in expected.values())


def perfect_outputs(boxes: torch.Tensor, labels: torch.Tensor, head: HeadConfig, grid: BEVGridConfig) -> dict[str, torch.Tensor]:
    """Head outputs that predict exactly the targets (heatmap logits of the Gaussian targets)."""
    targets = assign_targets([boxes], [labels], head, grid)
    outputs = {}
    for group_name, target in targets.items():
        outputs[f"{group_name}.heatmap"] = torch.logit(target.heatmap.clamp(1e-6, 1 - 1e-6))
        for branch, values in target.regression.items():
            channels = values.shape[-1]
            dense = torch.zeros(1, channels, grid.num_y * grid.num_x)
            for slot in torch.nonzero(target.mask[0]).squeeze(1).tolist():
                dense[0, :, target.indices[0, slot]] = values[0, slot]
            outputs[f"{group_name}.{branch}"] = dense.view(1, channels, grid.num_y, grid.num_x)
    return outputs


@pytest.mark.parametrize("bev_aug", [torch.eye(4), bev_aug_matrix(25.0, 1.05, flip_y=True)], ids=["identity", "rot-scale-flip"])
def test_encode_decode_round_trip_recovers_ego_boxes(bev_aug):
    boxes_ego, labels = labelled_boxes()
    boxes_aug = transform_boxes(bev_aug, boxes_ego)
    outputs = perfect_outputs(boxes_aug, labels, HEAD, GRID)
    decoded = decode_detections(outputs, bev_aug[None], HEAD, GRID, DecodeConfig(score_threshold=0.5))[0]
    assert len(decoded["boxes"]) == len(boxes_ego)
    # match by label (one box per class here)
    for box, label in zip(boxes_ego, labels):
        found = decoded["boxes"][decoded["labels"] == label]
        assert len(found) == 1, f"class {int(label)}: expected one detection, got {len(found)}"
        found = found[0]
        torch.testing.assert_close(found[:6], box[:6], atol=1e-4, rtol=1e-4)
        assert abs(math.remainder(float(found[6] - box[6]), 2 * math.pi)) < 1e-4
        torch.testing.assert_close(found[7:9], box[7:9], atol=1e-4, rtol=1e-4)
    assert torch.all(decoded["scores"] > 0.99)


def test_decoding_recovers_centres_within_a_cell_from_heatmap_peaks_alone():
    """With offsets zero, decoded centres are the cell corners: within one cell of the truth."""
    boxes, labels = labelled_boxes()
    outputs = perfect_outputs(boxes, labels, HEAD, GRID)
    for name in list(outputs):
        if name.endswith(".offset"):
            outputs[name].zero_()
    decoded = decode_detections(outputs, torch.eye(4)[None], HEAD, GRID, DecodeConfig(score_threshold=0.5))[0]
    for box, label in zip(boxes, labels):
        error = (decoded["boxes"][decoded["labels"] == label][0, :2] - box[:2]).abs()
        assert torch.all(error < GRID.cell_size)


def test_bev_aug_round_trip_through_geometry_transform_boxes():
    """The inverse of a scaled, flipped augmentation undoes it (what decoding relies on)."""
    boxes, _ = labelled_boxes()
    aug = bev_aug_matrix(-70.0, 0.9, flip_y=True)
    back = transform_boxes(torch.linalg.inv(aug), transform_boxes(aug, boxes))
    torch.testing.assert_close(back[:, [0, 1, 2, 3, 4, 5, 7, 8]], boxes[:, [0, 1, 2, 3, 4, 5, 7, 8]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cos(back[:, 6] - boxes[:, 6]), torch.ones(len(boxes)), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- NMS
def test_circle_nms_removes_near_duplicates_only():
    centres = torch.tensor([[0.0, 0.0], [0.5, 0.3], [5.0, 0.0], [5.1, 0.1], [20.0, 20.0]])
    scores = torch.tensor([0.9, 0.95, 0.5, 0.4, 0.3])
    keep = circle_nms(centres, scores, radius=2.0)
    assert keep.tolist() == [1, 2, 4]  # best first; 0 is within 2 m of 1, 3 within 2 m of 2
    assert circle_nms(centres, scores, radius=0.05).tolist() == [1, 0, 2, 3, 4]


def test_decode_applies_per_class_nms_radius():
    """Two car peaks 1.6 m apart merge (car radius 2 m); two pedestrian peaks 1.6 m apart stay."""
    head = HeadConfig(class_groups=[["car"], ["pedestrian"]])
    outputs = {}
    for group in ("car", "pedestrian"):
        heat = torch.full((1, 1, GRID.num_y, GRID.num_x), -10.0)
        heat[0, 0, 64, 64], heat[0, 0, 64, 66] = 3.0, 2.0  # 2 cells = 1.6 m apart, separate max-pool peaks
        outputs[f"{group}.heatmap"] = heat
        for branch, channels in (("offset", 2), ("height", 1), ("size", 3), ("rotation", 2), ("velocity", 2)):
            outputs[f"{group}.{branch}"] = torch.zeros(1, channels, GRID.num_y, GRID.num_x)
    decoded = decode_detections(outputs, torch.eye(4)[None], head, GRID, DecodeConfig())[0]
    assert (decoded["labels"] == CLASS_INDEX["car"]).sum() == 1
    assert (decoded["labels"] == CLASS_INDEX["pedestrian"]).sum() == 2
    assert torch.all(decoded["scores"][:-1] >= decoded["scores"][1:])


# --------------------------------------------------------------------------- submission
def test_submission_entries_round_trip_to_the_global_frame():
    yaw_global = 2.2
    global_from_ego = make_transform([math.cos(1.1), 0.0, 0.0, math.sin(1.1)], [411.3, 1180.9, 0.0])
    boxes_global = np.array(
        [[420.0, 1190.0, 1.0, 1.9, 4.6, 1.7, yaw_global, 2.0, -3.0], [405.0, 1175.0, 0.9, 0.7, 0.8, 1.8, -0.5, 0.0, 0.05]]
    )
    boxes_ego = transform_boxes(invert_transform(global_from_ego), boxes_global)
    entries = to_nuscenes_detections(
        torch.tensor(boxes_ego, dtype=torch.float32), torch.tensor([0.4, 0.8]), torch.tensor([0, 8]),
        torch.tensor(global_from_ego), sample_token="ca9a282c9e77460f8360f564131a8af5",
    )
    assert [e["detection_name"] for e in entries] == ["pedestrian", "car"]  # sorted by score
    pedestrian, car = entries
    np.testing.assert_allclose(car["translation"], boxes_global[0, :3], atol=1e-3)
    np.testing.assert_allclose(car["size"], boxes_global[0, 3:6], atol=1e-5)
    np.testing.assert_allclose(car["velocity"], boxes_global[0, 7:9], atol=1e-4)
    np.testing.assert_allclose(car["rotation"], [math.cos(yaw_global / 2), 0, 0, math.sin(yaw_global / 2)], atol=1e-5)
    assert car["attribute_name"] == "vehicle.moving" and pedestrian["attribute_name"] == "pedestrian.standing"
    for entry in entries:  # the devkit accepts them
        box = DetectionBox.deserialize(entry)
        assert box.sample_token == "ca9a282c9e77460f8360f564131a8af5"
        np.testing.assert_allclose(box.translation, entry["translation"])


def test_submission_keeps_at_most_500_best():
    boxes = torch.tensor([[1.0, 2.0, 0.5, 2.0, 4.0, 1.5, 0.0, 0.0, 0.0]]).repeat(600, 1)
    scores = torch.linspace(0.01, 0.99, 600)
    entries = to_nuscenes_detections(boxes, scores, torch.zeros(600, dtype=torch.long), np.eye(4))
    assert len(entries) == 500 and entries[0]["detection_score"] == pytest.approx(0.99)
    assert min(e["detection_score"] for e in entries) > scores[99]


# --------------------------------------------------------------------------- depth supervision
def test_depth_targets_take_the_nearest_lidar_point_per_block():
    view = ViewTransformerConfig(input_size=(32, 64), depth_bins=(1.0, 60.0, 1.0))
    depth_maps = torch.zeros(1, 1, 32, 64)
    depth_maps[0, 0, 3, 5] = 12.7  # block (0, 0): nearest of 12.7 and 30 -> bin 11 ([12, 13) m)
    depth_maps[0, 0, 10, 9] = 30.0
    depth_maps[0, 0, 20, 40] = 75.0  # block (1, 2): beyond the last bin -> invalid
    one_hot, valid = depth_targets(depth_maps, view)
    assert valid[0, 0].tolist() == [[True, False, False, False], [False, False, False, False]]
    assert one_hot[0, 0, 0, 0].argmax() == 11 and one_hot[0, 0, 0, 0].sum() == 1
    # the loss is BEVDepth's BCE summed over bins, averaged over valid cells only
    logits = torch.randn(1, 1, 59, 2, 4)
    total, per_sample = depth_loss(logits, depth_maps, view)
    expected = torch.nn.functional.binary_cross_entropy(
        logits.softmax(2)[0, 0, :, 0, 0], one_hot[0, 0, 0, 0], reduction="sum"
    )
    torch.testing.assert_close(total, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(per_sample, expected[None], rtol=1e-4, atol=1e-5)


def test_object_depth_labels_give_each_block_the_depth_of_the_object_it_shows():
    """Foreground priority: a block holding LiDAR points inside a GT box is labelled with them, even
    when a nearer road point shares the block; elsewhere the block's nearest point stays the label."""
    view = ViewTransformerConfig(input_size=(32, 64), feature_stride=16, depth_target="object")
    depth_maps = torch.zeros(1, 1, 32, 64)
    object_maps = torch.zeros(1, 1, 32, 64)
    depth_maps[0, 0, 14, 3] = 9.2  # block (0, 0): a road point in front of the object ...
    depth_maps[0, 0, 4, 6] = object_maps[0, 0, 4, 6] = 23.5  # ... and the object's surface
    depth_maps[0, 0, 30, 20] = 6.4  # block (1, 1): road only
    target, valid = depth_targets(depth_maps, view, object_maps)
    assert valid[0, 0].tolist() == [[True, False, False, False], [False, True, False, False]]
    assert target[0, 0, 0, 0].argmax() == 22 and target[0, 0, 1, 1].argmax() == 5
    nearest, _ = depth_targets(depth_maps, dataclasses.replace(view, depth_target="nearest"))
    assert nearest[0, 0, 0, 0].argmax() == 8  # BEVDepth's rule labels the block with the road
    with pytest.raises(KeyError, match="object_depth_maps"):
        depth_targets(depth_maps, view)
    soft, _ = depth_targets(depth_maps, dataclasses.replace(view, depth_target_sigma=1.0), object_maps)
    assert soft[0, 0, 0, 0].sum() == pytest.approx(1.0) and soft[0, 0, 0, 0].argmax() == 22
    assert soft[0, 0, 0, 0, 21] > soft[0, 0, 0, 0, 20] > 0  # mass on the neighbouring bins


def test_ray_features_locate_the_ground_and_follow_the_augmentation():
    """The inverse ground depth of a ray is 1 / d where origin + d * direction meets z = 0."""
    cfg = tiny_config(depth_supervision=False)
    batch = synthetic_ring_batch(cfg, batch_size=2)
    pixels = torch.stack(torch.meshgrid(torch.arange(12.0) * 16 + 7.5, torch.arange(4.0) * 16 + 7.5, indexing="xy"), -1)
    origins, directions = rays_in_ego(pixels, batch["intrinsics"], batch["ego_from_camera"], batch["image_aug"], batch["bev_aug"])
    features = ray_features(origins, directions)  # [B, N, 7, h, w]
    assert features.shape == (2, 6, 7, 4, 12)
    assert (features[:, :, 6] == 1).all()  # no mirror in either augmentation
    azimuth = torch.atan2(directions[..., 1], directions[..., 0])
    torch.testing.assert_close(features[:, :, 4:6].double(), torch.stack([azimuth.cos(), azimuth.sin()], 2), atol=1e-6, rtol=0)
    inverse_ground_depth = features[:, :, 2].double() / 10.0
    down = inverse_ground_depth > 0
    assert down.any() and (~down).any()  # rows below and above the horizon
    ground = origins[:, :, None, None, :] + directions / inverse_ground_depth.clamp(min=1e-9)[..., None]
    torch.testing.assert_close(ground[..., 2][down], torch.zeros_like(ground[..., 2][down]), atol=1e-4, rtol=0)
    torch.testing.assert_close(features[:, :, 1], torch.full_like(features[:, :, 1], 0.8))  # camera height / 2
    # a 2x image zoom halves the metres a feature cell spans: log-scale channel drops by log 2
    zoom = torch.diag(torch.tensor([2.0, 2.0, 1.0]))
    zoomed = ray_features(*rays_in_ego(pixels, batch["intrinsics"], batch["ego_from_camera"],
                                       zoom @ batch["image_aug"], batch["bev_aug"]))
    torch.testing.assert_close(features[:, :, 3] - zoomed[:, :, 3], torch.full_like(features[:, :, 3], math.log(2.0)),
                               atol=5e-3, rtol=0)


@pytest.mark.parametrize("mirror", ["image flip", "BEV mirror", "both"])
def test_the_observation_angle_follows_the_image_not_the_mirror(mirror):
    """The image target of a box is its observation angle as the image shows it: an image flip mirrors the
    image, so the sine changes sign; a BEV mirror leaves the image as it is, so the target does too; both
    together mirror the image. Turned by the ray's azimuth and the ray features' handedness, it gives back
    the box yaw in the augmented frame in every case."""
    from bevperc.geometry import transform_boxes
    from bevperc.models.image_head import image_targets
    from bevperc.models.lift import RAY_AZIMUTH, RAY_HANDEDNESS, ego_heading

    cfg = tiny_config(depth_supervision=False)
    cfg.image_head = ImageHeadConfig(enabled=True, lift_scores=True, heading=True)
    batch = synthetic_ring_batch(cfg, batch_size=1)
    plain = image_targets(batch, cfg.view)
    mirrored = dict(batch)
    image_flip = mirror in ("image flip", "both")
    if image_flip:  # u' -> width - 1 - u'
        flip = torch.tensor([[-1.0, 0.0, cfg.view.input_size[1] - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        mirrored["image_aug"] = flip @ batch["image_aug"]
    if mirror in ("BEV mirror", "both"):  # y -> -y
        mirrored["bev_aug"] = torch.diag(torch.tensor([1.0, -1.0, 1.0, 1.0]))[None] @ batch["bev_aug"]
        mirrored["gt_boxes"] = [transform_boxes(torch.diag(torch.tensor([1.0, -1.0, 1.0, 1.0])), batch["gt_boxes"][0])]
    found = image_targets(mirrored, cfg.view)
    assert len(found.centres) == len(plain.centres) >= 3  # the same boxes, in the same (camera, box) order
    sign = torch.tensor([-1.0 if image_flip else 1.0, 1.0])
    torch.testing.assert_close(found.observation, plain.observation * sign, atol=1e-6, rtol=0)
    assert (plain.observation[:, 0].abs() > 0.1).any()  # the sine matters for some box
    # heading_as_imaged=False: the angle of the augmented ego frame, whatever the image shows
    ego_frame = image_targets(mirrored, cfg.view, as_imaged=False).observation
    bev_mirrored = mirror in ("BEV mirror", "both")
    torch.testing.assert_close(ego_frame, plain.observation * torch.tensor([-1.0 if bev_mirrored else 1.0, 1.0]),
                               atol=1e-6, rtol=0)

    rays = build_detector(cfg).view_transformer.ray_inputs(mirrored)  # [N, 7, h, w]
    height, width = cfg.view.feature_size
    camera, cell = found.centres // (height * width), found.centres % (height * width)
    at_centres = rays[camera, :, cell // width, cell % width][..., None, None]  # [K, 7, 1, 1]
    assert (at_centres[:, RAY_HANDEDNESS] == (-1.0 if mirror != "both" else 1.0)).all()
    heading = ego_heading(found.observation[..., None, None], at_centres[:, RAY_AZIMUTH], at_centres[:, RAY_HANDEDNESS])
    yaws = torch.atan2(heading[:, 0, 0, 0], heading[:, 1, 0, 0]).double()
    box_yaws = mirrored["gt_boxes"][0][:, 6].double()
    # each target's box is the one of its yaw: the ray through the centre cell is within a cell of the box centre
    gaps = (yaws[:, None] - box_yaws[None, :] + math.pi).remainder(2 * math.pi) - math.pi
    assert gaps.abs().min(dim=1).values.max() < 0.1


def test_image_heatmap_targets_peak_where_each_box_centre_projects():
    from bevperc.models.image_head import image_targets

    cfg = tiny_config(depth_supervision=False)
    batch = synthetic_ring_batch(cfg, batch_size=2)
    found = image_targets(batch, cfg.view)
    targets = found.heatmap  # [B, N, classes, h, w]
    height, width = cfg.view.feature_size
    assert targets.shape == (2, 6, 10, height, width)
    expected = torch.zeros_like(targets, dtype=torch.bool)
    for b, (boxes, labels) in enumerate(zip(batch["gt_boxes"], batch["gt_labels"])):
        ego = transform_boxes(invert_transform(batch["bev_aug"][b].double()), boxes.double())  # back to the ego frame
        for n in range(6):
            camera = invert_transform(batch["ego_from_camera"][b, n].double())
            centre = camera[:3, :3] @ ego[:, :3].T + camera[:3, 3:4]  # [3, M]
            pixels = batch["image_aug"][b, n].double() @ batch["intrinsics"][b, n].double() @ (centre / centre[2])
            cells = torch.floor(pixels[:2] / cfg.view.feature_stride).long()
            for m in range(len(boxes)):
                x, y = cells[:, m].tolist()
                if centre[2, m] > 1.0 and 0 <= x < width and 0 <= y < height:
                    expected[b, n, labels[m], y, x] = True
    assert expected.sum() >= 3  # several boxes are seen by some camera
    assert torch.equal(targets == 1, expected)
    # the observation angle turned by the azimuth of the camera -> centre ray gives back the box yaw
    from bevperc.models.lift import ego_heading

    assert len(found.centres) == int(expected.sum()) and found.observation.shape == (len(found.centres), 2)
    flat = found.centres
    b, rest = flat // (6 * height * width), flat % (6 * height * width)
    n, cell = rest // (height * width), rest % (height * width)
    for k in range(len(flat)):
        boxes = batch["gt_boxes"][int(b[k])]
        origin = (batch["bev_aug"][int(b[k])] @ batch["ego_from_camera"][int(b[k]), int(n[k])])[:2, 3]
        matching = [m for m in range(len(boxes)) if expected[b[k], n[k], batch["gt_labels"][int(b[k])][m],
                                                             cell[k] // width, cell[k] % width]]
        sight = boxes[matching[0], :2] - origin
        azimuth = torch.stack([torch.cos(torch.atan2(sight[1], sight[0])), torch.sin(torch.atan2(sight[1], sight[0]))])
        pixel_from_ray = batch["image_aug"][int(b[k]), int(n[k])] @ batch["intrinsics"][int(b[k]), int(n[k])]
        ray_from_ego = batch["bev_aug"][int(b[k])] @ batch["ego_from_camera"][int(b[k]), int(n[k])]
        handedness = torch.sign(torch.det(pixel_from_ray.double()) * torch.det(ray_from_ego[:3, :3].double()))
        yaw = ego_heading(found.observation[k].view(1, 2, 1, 1), azimuth.view(1, 2, 1, 1),
                          handedness.float().view(1, 1, 1, 1)).flatten()
        torch.testing.assert_close(yaw, torch.stack([torch.sin(boxes[matching[0], 6]), torch.cos(boxes[matching[0], 6])]),
                                   atol=1e-5, rtol=0)


def test_lifted_class_scores_and_heading_reach_the_bev():
    """lift_scores appends the image head's class probabilities (and with heading its ego-frame heading)
    to the lifted context; the full-resolution skip reads the input map."""
    torch.manual_seed(0)
    cfg = tiny_config(depth_supervision=True)
    cfg.image_head = dataclasses.replace(cfg.image_head, enabled=True, lift_scores=True, heading=True)
    cfg.bev_encoder.full_resolution_skip = True
    model = build_detector(cfg).train()
    view = model.view_transformer
    assert view.out_channels == cfg.view.context_channels + 10 + 2
    batch = synthetic_ring_batch(cfg, batch_size=1)
    outputs = model(batch)
    task_losses, _ = model.loss(outputs, batch)
    assert {"image_heatmap", "image_heading", "depth"} <= set(task_losses) and list(task_losses) == task_names(cfg)
    assert task_losses["image_heading"] > 0
    (grad,) = torch.autograd.grad(task_losses["car+truck.heatmap"], view.image_head.layers[-1].weight, retain_graph=True)
    assert grad[:10].abs().sum() > 0, "the BEV heatmap loss reaches the image head through the lifted scores"
    assert grad[10:].abs().sum() > 0, "... and through the lifted heading"
    (grad,) = torch.autograd.grad(task_losses["car+truck.heatmap"], model.bev_encoder.refine[0].weight)
    assert grad[:, model.bev_encoder.out_channels:].abs().sum() > 0, "the skip reads the input BEV map"
    model.eval()
    with torch.no_grad():
        assert "image_heatmap" in model(batch)  # lifted scores: the image head also runs at inference


# --------------------------------------------------------------------------- config + backbone
def tiny_config(depth_supervision: bool = True) -> ModelConfig:
    cfg = ModelConfig(backbone=BackboneConfig(depth=18), grid=BEVGridConfig(cell_size=1.6), decode=DecodeConfig(top_k=200))
    cfg.neck = NeckConfig(out_channels=32)
    cfg.view = ViewTransformerConfig(input_size=(64, 192), context_channels=16, depth_supervision=depth_supervision)
    cfg.bev_encoder = BEVEncoderConfig(stage_channels=(16, 32), blocks_per_stage=1, out_channels=32)
    cfg.head = HeadConfig(class_groups=[["car", "truck"], ["pedestrian"]], shared_channels=16, head_channels=16, min_radius=1)
    return cfg


def test_model_config_loads_from_yaml_and_rejects_bad_values(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump({"backbone": {"depth": 18}, "grid": {"cell_size": 1.6}, "view": {"depth_bins": [2, 58, 0.5]}}))
    cfg = load_config(ModelConfig, path)
    assert cfg.backbone.depth == 18 and cfg.grid.num_x == 64 and cfg.view.num_depth_bins == 112
    assert cfg.head.group_names[1] == "truck+construction_vehicle"
    with pytest.raises(ConfigError, match="backbone.depth"):
        load_config(ModelConfig, None, ["backbone.depth=101"])
    with pytest.raises(ConfigError, match="unknown class 'van'"):
        load_config(ModelConfig, None, ["head.class_groups=[[car, van]]"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(ModelConfig, None, ["head.num_heads=3"])


def test_default_task_weights_follow_centerpoint_and_bevdepth():
    cfg = tiny_config()
    weights = default_task_weights(cfg)
    assert list(weights) == task_names(cfg)
    assert weights["car+truck.heatmap"] == 1.0 and weights["car+truck.size"] == 0.25
    assert weights["pedestrian.velocity"] == pytest.approx(0.05) and weights["depth"] == 3.0
    assert "depth" not in default_task_weights(tiny_config(depth_supervision=False))


def test_backbone_frozen_stages_and_norm_eval():
    backbone = build_backbone(BackboneConfig(depth=18, frozen_stages=1), min_stride=16).train()
    stem, layer1, layer2 = backbone.stages[0], backbone.stages[1], backbone.stages[2]
    assert not any(p.requires_grad for p in stem.parameters())
    assert not any(p.requires_grad for p in layer1.parameters())
    assert all(p.requires_grad for p in layer2.parameters())
    assert not layer1[0].bn1.training and layer2[0].bn1.training
    backbone = build_backbone(BackboneConfig(depth=34, norm_eval=True), min_stride=16).train()
    assert all(not m.training for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    features = build_backbone(BackboneConfig(depth=50), min_stride=16)(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in features] == [(1, 1024, 4, 6), (1, 2048, 2, 3)]


def torchvision_reference(cfg: BackboneConfig, images: torch.Tensor) -> torch.Tensor:
    """The last map of the backbone, computed by the plain torchvision model (same seed, same weights)."""
    if cfg.name == "resnet":
        net = getattr(torchvision.models, f"resnet{cfg.depth}")().eval()
        x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
        for layer in [net.layer1, net.layer2, net.layer3, net.layer4][: cfg.num_stages]:
            x = layer(x)
        return x
    if cfg.name == "regnet_x_400mf":
        net = torchvision.models.regnet_x_400mf().eval()
        return net.trunk_output(net.stem(images))
    return getattr(torchvision.models, cfg.name)().eval().features(images)


@pytest.mark.parametrize("name", BACKBONE_NAMES)
@pytest.mark.parametrize("stride", [8, 16])
def test_every_backbone_builds_and_matches_torchvision_at_stride_8_and_16(name, stride):
    cfg = BackboneConfig(name=name, depth=18, num_stages=3 if name == "resnet" else 4, channels_last=stride == 8)
    images = torch.randn(2, 3, 64, 96)
    torch.manual_seed(0)
    backbone = build_backbone(cfg, min_stride=stride).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        expected = torchvision_reference(cfg, images)
        features = backbone(images)
    strides = [16 * 2**i for i in range(len(features))] if stride == 16 else [8 * 2**i for i in range(len(features))]
    assert [f.shape[-2:] for f in features] == [(64 // s, 96 // s) for s in strides]
    assert tuple(f.shape[1] for f in features) == backbone.out_channels
    torch.testing.assert_close(features[-1], expected, rtol=1e-4, atol=1e-4)
    # the whole detector builds on it and trains: finite losses, gradient into the backbone's first stage
    model_cfg = tiny_config(depth_supervision=False)
    model_cfg.backbone, model_cfg.view.feature_stride = cfg, stride
    model = build_detector(model_cfg).train()
    batch = synthetic_ring_batch(model_cfg, batch_size=1)
    task_losses, _ = model.loss(model(batch), batch)
    sum(task_losses.values()).backward()
    assert all(torch.isfinite(v) for v in task_losses.values())
    assert next(model.backbone.stages[0].parameters()).grad.abs().sum() > 0


# --------------------------------------------------------------------------- whole detector
def synthetic_ring_batch(cfg: ModelConfig, batch_size: int = 2, seed: int = 0) -> dict:
    """Contract batch: 6 cameras on a ring facing out every 60 deg, random images, real-ish geometry."""
    generator = torch.Generator().manual_seed(seed)
    height, width = cfg.view.input_size
    intrinsics = torch.tensor([[1260.0, 0.0, 800.0], [0.0, 1260.0, 450.0], [0.0, 0.0, 1.0]])
    scale = width / 1600.0
    image_aug = torch.tensor([[scale, 0.0, 0.0], [0.0, scale, -(900 * scale - height)], [0.0, 0.0, 1.0]])
    cameras = []
    for k in range(6):
        yaw = k * math.pi / 3
        forward = torch.tensor([math.cos(yaw), math.sin(yaw), 0.0])
        right = torch.tensor([math.sin(yaw), -math.cos(yaw), 0.0])
        down = torch.tensor([0.0, 0.0, -1.0])
        ego_from_camera = torch.eye(4)
        ego_from_camera[:3, 0], ego_from_camera[:3, 1], ego_from_camera[:3, 2] = right, down, forward
        ego_from_camera[:3, 3] = torch.tensor([1.0 * math.cos(yaw), 1.0 * math.sin(yaw), 1.6])
        cameras.append(ego_from_camera)
    boxes, labels = labelled_boxes()
    depth_maps = torch.zeros(batch_size, 6, height, width)
    rows = torch.randint(height // 2, height, (500,), generator=generator)
    cols = torch.randint(0, width, (500,), generator=generator)
    depth_maps[:, :, rows, cols] = torch.rand(500, generator=generator) * 50 + 2
    return {
        "images": torch.randn(batch_size, 6, 3, height, width, generator=generator),
        "intrinsics": intrinsics.expand(batch_size, 6, 3, 3).clone(),
        "ego_from_camera": torch.stack(cameras).expand(batch_size, 6, 4, 4).clone(),
        "image_aug": image_aug.expand(batch_size, 6, 3, 3).clone(),
        "bev_aug": torch.stack([torch.eye(4), bev_aug_matrix(15.0, 1.0, flip_y=False)][:batch_size]),
        "gt_boxes": [boxes, boxes[:3]][:batch_size],
        "gt_labels": [labels, labels[:3]][:batch_size],
        "depth_maps": depth_maps,
        "global_from_ego": torch.eye(4, dtype=torch.float64).expand(batch_size, 4, 4).clone(),
        "sample_token": [f"token{b}" for b in range(batch_size)],
    }


def test_detector_forward_backward_gives_finite_losses_and_gradients_for_every_task():
    torch.manual_seed(0)
    cfg = tiny_config(depth_supervision=True)
    model = build_detector(cfg).train()
    assert isinstance(model, BEVDetector)
    batch = synthetic_ring_batch(cfg)
    outputs = model(batch)
    assert outputs["car+truck.heatmap"].shape == (2, 2, 64, 64)
    assert outputs["pedestrian.size"].shape == (2, 3, 64, 64)
    assert outputs["depth"].shape == (2, 6, 59, 4, 12)
    task_losses, per_sample = model.loss(outputs, batch)
    assert list(task_losses) == task_names(cfg)
    assert set(per_sample) == set(task_losses)
    for name, value in task_losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
        assert per_sample[name].shape == (2,) and torch.all(torch.isfinite(per_sample[name])), name
        assert value > 0, f"{name}: every task has objects in this batch, its loss must be positive"
    # each task reaches the network: gradient w.r.t. the head's shared conv (head tasks) or the depth net
    shared_weight = model.head.shared[0].weight
    depth_weight = model.view_transformer.depth_net[-1].weight
    for name, value in task_losses.items():
        (grad,) = torch.autograd.grad(value, depth_weight if name == "depth" else shared_weight, retain_graph=True)
        assert torch.all(torch.isfinite(grad)) and grad.abs().sum() > 0, name
    weights = default_task_weights(cfg)
    total = sum(weights[name] * value for name, value in task_losses.items())
    total.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.all(torch.isfinite(param.grad)), name
    assert model.backbone.stages[0][0].weight.grad.abs().sum() > 0, "the image backbone gets gradient through the lift"

    model.eval()
    with torch.no_grad():
        detections = model.decode(model(batch), batch)
    assert len(detections) == 2
    for det in detections:
        assert det["boxes"].shape[1] == 9 and len(det["boxes"]) == len(det["scores"]) == len(det["labels"]) <= 500
        assert torch.all(torch.isfinite(det["boxes"]))
    entries = to_nuscenes_detections(detections[0]["boxes"], detections[0]["scores"], detections[0]["labels"],
                                     batch["global_from_ego"][0], sample_token=batch["sample_token"][0])
    assert all(DetectionBox.deserialize(e).detection_name in ("car", "truck", "pedestrian") for e in entries)


def test_bfloat16_autocast_on_cpu_keeps_the_splat_and_the_losses_in_float32():
    """CPU bfloat16 autocast (``train.amp``): the convolutions run in bfloat16; the BEV pooling sums
    float32 (depth probabilities float32, the pooled BEV float32) and every task loss is float32 and
    close to its float32 value; the gradients are finite."""
    torch.manual_seed(0)
    cfg = tiny_config(depth_supervision=True)
    model = build_detector(cfg).eval()  # eval: BatchNorm statistics fixed, so both passes see the same model
    batch = synthetic_ring_batch(cfg)
    pooled = []
    model.bev_encoder.register_forward_pre_hook(lambda module, inputs: pooled.append(inputs[0].dtype))
    reference, _ = model.loss(model(batch), batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(batch)
        task_losses, _ = model.loss(outputs, batch)
    assert outputs["car+truck.heatmap"].dtype == torch.bfloat16, "autocast did not reach the head's convolutions"
    assert pooled == [torch.float32, torch.float32], "the splat must sum in float32 under autocast"
    for name, value in task_losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), name
        assert value.item() == pytest.approx(reference[name].item(), rel=0.05, abs=1e-3), name
    sum(task_losses.values()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.all(torch.isfinite(param.grad)), name


def test_detector_rejects_wrong_input_size():
    cfg = tiny_config(depth_supervision=False)
    model = build_detector(cfg)
    batch = synthetic_ring_batch(cfg, batch_size=1)
    batch["images"] = batch["images"][..., :32, :]
    with pytest.raises(ValueError, match="view.input_size"):
        model(batch)


def test_orient_by_image_turns_the_boxes_whose_heading_the_image_contradicts():
    """An image head that predicts each box's true observation angle turns every box decoded back to front
    (and only those) to its true yaw; a box no camera sees keeps its yaw."""
    from bevperc.models.image_head import image_targets, orient_by_image

    cfg = tiny_config(depth_supervision=False)
    batch = synthetic_ring_batch(cfg, batch_size=1)
    boxes, labels = batch["gt_boxes"][0], batch["gt_labels"][0]
    found = image_targets(batch, cfg.view)
    classes = len(DETECTION_CLASSES)
    height, width = cfg.view.feature_size
    logits = torch.full((6, classes + 2, height, width), -10.0)
    logits[:, :classes][found.heatmap[0] == 1] = 10.0
    heading = torch.zeros(6 * height * width, 2)
    heading[found.centres] = found.observation
    logits[:, classes:] = heading.view(6, height, width, 2).permute(0, 3, 1, 2)
    far = torch.tensor([[3.0, 0.0, 60.0, 2.0, 4.5, 1.6, 0.3, 0.0, 0.0]])  # above every camera's view
    decoded = torch.cat([boxes, far])
    decoded_labels = torch.cat([labels, labels[:1]])
    back_to_front = decoded.clone()
    back_to_front[:, 6] = back_to_front[:, 6] + math.pi
    right = orient_by_image([{"boxes": decoded, "scores": torch.ones(len(decoded)), "labels": decoded_labels}],
                            logits, batch, cfg.view)[0]
    turned = orient_by_image([{"boxes": back_to_front, "scores": torch.ones(len(decoded)), "labels": decoded_labels}],
                             logits, batch, cfg.view)[0]
    assert torch.equal(right["boxes"], decoded)  # nothing to turn
    seen = []  # the centre projects into some camera's image, in front of it
    for box in decoded.double():
        centre = torch.cat([box[:3], torch.ones(1, dtype=torch.float64)])
        camera = torch.linalg.inv(batch["ego_from_camera"][0].double()) @ centre  # [N, 4]
        pixels = (batch["image_aug"][0] @ batch["intrinsics"][0]).double() @ camera[:, :3, None]
        u, v = pixels[:, 0, 0] / pixels[:, 2, 0], pixels[:, 1, 0] / pixels[:, 2, 0]
        seen.append(bool(((camera[:, 2] > 1) & (u >= 0) & (u < cfg.view.input_size[1]) & (v >= 0)
                          & (v < cfg.view.input_size[0])).any()))
    seen = torch.tensor(seen)
    assert seen.sum() >= 4 and not seen.all()
    gap = (turned["boxes"][:, 6] - decoded[:, 6] + math.pi).remainder(2 * math.pi) - math.pi
    assert gap[seen].abs().max() < 1e-5  # turned back to the true yaw
    assert torch.equal(turned["boxes"][~seen, 6], back_to_front[~seen, 6])  # unseen: unchanged
    torch.testing.assert_close(turned["boxes"][:, [0, 1, 2, 3, 4, 5, 7, 8]], back_to_front[:, [0, 1, 2, 3, 4, 5, 7, 8]])
    assert turned["boxes"][seen, 6].abs().max() <= math.pi  # turned yaws are wrapped


def test_direction_from_image_needs_the_observation_angle():
    with pytest.raises(ConfigError, match="decode.direction_from_image needs"):
        load_config(ModelConfig, None, ["decode.direction_from_image=true"])
    cfg = load_config(ModelConfig, None, ["decode.direction_from_image=true", "image_head.enabled=true",
                                          "image_head.heading=true"])
    assert cfg.decode.direction_from_image
