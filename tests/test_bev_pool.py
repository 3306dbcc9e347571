"""BEV pooling: fast == LSS reference == Python loop (values and gradients); frustum geometry."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bevperc.geometry import project_to_image
from bevperc.models.bev_pool import (
    PoolPlanCache,
    QuickCumsum,
    bev_pool,
    bev_pool_dense_loop,
    bev_pool_quickcumsum,
    make_pool_plan,
    voxel_index,
)
from bevperc.models.config import BEVGridConfig, ViewTransformerConfig
from bevperc.models.lift import LSSViewTransformer, frustum_to_ego, make_frustum
from helpers.geometry import bev_aug_matrix

SAMPLE_INFO = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "nuscenes-real-sample" / "sample_info.json"
CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
ORIGINAL_SIZE = (1600, 900)  # nuScenes camera (width, height)


def real_rig() -> tuple[torch.Tensor, torch.Tensor]:
    """(intrinsics [6, 3, 3], ego_from_camera [6, 4, 4]) of the real nuScenes keyframe, read in place."""
    if not SAMPLE_INFO.is_file():
        pytest.skip(f"real nuScenes sample not found at {SAMPLE_INFO}")
    images = json.loads(SAMPLE_INFO.read_text())["data_list"][0]["images"]
    intrinsics = torch.tensor([images[cam]["cam2img"] for cam in CAMERAS], dtype=torch.float32)
    ego_from_camera = torch.tensor([images[cam]["cam2ego"] for cam in CAMERAS], dtype=torch.float32)
    return intrinsics, ego_from_camera


def resize_crop_aug(input_size: tuple[int, int], flip: bool = False) -> torch.Tensor:
    """image_aug [3, 3]: resize 1600x900 to the input width, crop the bottom rows, optional h-flip."""
    height, width = input_size
    scale = width / ORIGINAL_SIZE[0]
    crop_top = ORIGINAL_SIZE[1] * scale - height
    aug = torch.tensor([[scale, 0.0, 0.0], [0.0, scale, -crop_top], [0.0, 0.0, 1.0]])
    if flip:
        aug = torch.tensor([[-1.0, 0.0, width], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ aug
    return aug


# --------------------------------------------------------------------------- tiny exact cases
TINY_GRID = BEVGridConfig(x_range=(-2.0, 2.0), y_range=(-3.0, 3.0), z_range=(-1.0, 1.0), cell_size=1.0)


def tiny_case(dtype=torch.float64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    batch, cams, bins, height, width, channels = 2, 2, 3, 2, 3, 2
    depth = torch.rand(batch, cams, bins, height, width, generator=generator, dtype=dtype).softmax(2)
    context = torch.randn(batch, cams, height, width, channels, generator=generator, dtype=dtype)
    # points spread over 1.5x the grid so some fall outside in x, y and z
    points = (torch.rand(batch, cams, bins, height, width, 3, generator=generator, dtype=dtype) - 0.5) * torch.tensor(
        [6.0, 9.0, 3.0], dtype=dtype
    )
    return depth, context, points


def test_tiny_case_drops_points_and_shares_cells():
    _, _, points = tiny_case()
    cell, valid = voxel_index(points, TINY_GRID)
    assert 0 < valid.sum() < valid.numel(), "the tiny case must have both kept and dropped points"
    assert len(torch.unique(cell[valid])) < valid.sum(), "the tiny case must have cells with several points"


def test_fast_pool_equals_python_loop_values_and_gradients():
    depth, context, points = tiny_case()
    plan = make_pool_plan(points, TINY_GRID)
    weights = torch.randn(2, context.shape[-1], TINY_GRID.num_y, TINY_GRID.num_x, dtype=torch.float64)

    results = []
    for pool in (lambda d, c: bev_pool(d, c, plan, chunk_size=7), lambda d, c: bev_pool_dense_loop(d, c, points, TINY_GRID)):
        d, c = depth.clone().requires_grad_(), context.clone().requires_grad_()
        out = pool(d, c)
        (out * weights).sum().backward()
        results.append((out.detach(), d.grad, c.grad))
    (fast, fast_gd, fast_gc), (loop, loop_gd, loop_gc) = results
    assert fast.shape == (2, 2, TINY_GRID.num_y, TINY_GRID.num_x)
    torch.testing.assert_close(fast, loop, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast_gd, loop_gd, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast_gc, loop_gc, rtol=1e-12, atol=1e-12)
    assert fast.abs().sum() > 0 and fast_gd.abs().sum() > 0


def test_fast_pool_gradcheck():
    depth, context, points = tiny_case()
    plan = make_pool_plan(points, TINY_GRID)
    for chunk_size in (4, 1 << 17):  # chunked and single-shot paths
        assert torch.autograd.gradcheck(
            lambda d, c: bev_pool(d, c, plan, chunk_size=chunk_size),
            (depth.clone().requires_grad_(), context.clone().requires_grad_()),
        )


def test_quickcumsum_reference_gradcheck_and_matches_loop():
    depth, context, points = tiny_case(seed=1)
    assert torch.autograd.gradcheck(
        lambda d, c: bev_pool_quickcumsum(d, c, points, TINY_GRID),
        (depth.clone().requires_grad_(), context.clone().requires_grad_()),
    )
    torch.testing.assert_close(
        bev_pool_quickcumsum(depth, context, points, TINY_GRID), bev_pool_dense_loop(depth, context, points, TINY_GRID)
    )
    rows = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    ranks = torch.tensor([0, 0, 2, 5, 5])
    assert torch.autograd.gradcheck(lambda x: QuickCumsum.apply(x, ranks)[0], (rows,))


# --------------------------------------------------------------------------- realistic case
def realistic_geometry(batch: int, input_size: tuple[int, int]) -> dict[str, torch.Tensor]:
    intrinsics, ego_from_camera = real_rig()
    return {
        "intrinsics": intrinsics.expand(batch, -1, -1, -1).clone(),
        "ego_from_camera": ego_from_camera.expand(batch, -1, -1, -1).clone(),
        "image_aug": torch.stack([resize_crop_aug(input_size, flip=b % 2 == 1) for b in range(batch)])[:, None]
        .expand(-1, 6, -1, -1)
        .clone(),
        "bev_aug": torch.stack([bev_aug_matrix(20.0 * b, 1.0 + 0.05 * b, flip_y=b % 2 == 1) for b in range(batch)]),
    }


def test_fast_pool_equals_quickcumsum_on_real_rig():
    """256x704 input, 6 real cameras, 59 bins, 128x128 grid: values and gradients agree in float64."""
    view = ViewTransformerConfig(input_size=(256, 704), depth_bins=(1.0, 60.0, 1.0), context_channels=8)
    grid = BEVGridConfig()
    geometry = realistic_geometry(2, view.input_size)
    points = frustum_to_ego(make_frustum(view), **geometry)
    height, width = view.feature_size
    generator = torch.Generator().manual_seed(0)
    depth = torch.rand(2, 6, view.num_depth_bins, height, width, generator=generator, dtype=torch.float64).softmax(2)
    context = torch.randn(2, 6, height, width, 8, generator=generator, dtype=torch.float64)
    weights = torch.randn(2, 8, grid.num_y, grid.num_x, generator=generator, dtype=torch.float64)
    plan = make_pool_plan(points, grid)
    assert 0.3 < plan.point_ids.numel() / points[..., 0].numel() < 1.0, "most but not all points are in the grid"

    outs = []
    for pool in (lambda d, c: bev_pool(d, c, plan), lambda d, c: bev_pool_quickcumsum(d, c, points, grid)):
        d, c = depth.clone().requires_grad_(), context.clone().requires_grad_()
        out = pool(d, c)
        (out * weights).sum().backward()
        outs.append((out.detach(), d.grad, c.grad))
    for fast, reference in zip(outs[0], outs[1]):
        torch.testing.assert_close(fast, reference, rtol=1e-9, atol=1e-9)
    assert (outs[0][0].abs().sum(1) > 0).float().mean() > 0.2, "the pooled BEV covers a good part of the grid"


def test_plan_cache_reuses_plan_for_unchanged_geometry():
    view = ViewTransformerConfig(input_size=(128, 352), context_channels=4)
    grid = BEVGridConfig(cell_size=1.6)
    transformer = LSSViewTransformer(in_channels=8, view=view, grid=grid)
    geometry = realistic_geometry(1, view.input_size)
    features = torch.randn(6, 8, *view.feature_size)
    first, _, _ = transformer(features, geometry)
    second, _, _ = transformer(features, {k: v.clone() for k, v in geometry.items()})
    assert (transformer.plan_cache.hits, transformer.plan_cache.misses) == (1, 1)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    moved = {k: v.clone() for k, v in geometry.items()}
    moved["bev_aug"][0, 0, 3] += 0.8  # shift the ego frame by one cell in x
    third, _, _ = transformer(features, moved)
    assert transformer.plan_cache.misses == 2
    assert not torch.equal(first, third)
    # an uncached plan gives the same result as the cached path
    fresh = make_pool_plan(transformer.geometry(moved), grid)
    cache = PoolPlanCache()
    assert cache.get((moved["bev_aug"],), lambda: fresh) is fresh
    assert cache.get((moved["bev_aug"].clone(),), lambda: None) is fresh


# --------------------------------------------------------------------------- geometry written out
def test_pixel_at_known_depth_maps_to_expected_ego_point():
    """Project an ego point into an augmented camera, lift it back: same point in the augmented ego frame."""
    intrinsics, ego_from_camera = real_rig()
    input_size = (256, 704)
    image_aug = resize_crop_aug(input_size, flip=True)
    bev_aug = bev_aug_matrix(30.0, 1.1, flip_y=True)
    point_ego = torch.tensor([15.0, 4.0, 0.5], dtype=torch.float64)  # ahead-left: seen by CAM_FRONT (index 0)
    camera_from_ego = torch.linalg.inv(ego_from_camera[0].double())
    point_camera = camera_from_ego[:3, :3] @ point_ego + camera_from_ego[:3, 3]
    pixel, depth = project_to_image(point_camera, intrinsics[0].double())
    pixel_aug = image_aug.double() @ torch.cat([pixel, torch.ones(1, dtype=torch.float64)])
    assert 0 <= pixel_aug[0] < input_size[1] and 0 <= pixel_aug[1] < input_size[0], "point must be in the image"
    frustum = torch.stack([pixel_aug[0], pixel_aug[1], depth]).reshape(1, 1, 1, 3)
    lifted = frustum_to_ego(frustum, intrinsics[None, :1], ego_from_camera[None, :1], image_aug[None, None], bev_aug[None])
    expected = bev_aug.double()[:3, :3] @ point_ego + bev_aug.double()[:3, 3]
    torch.testing.assert_close(lifted.reshape(3), expected, rtol=0, atol=1e-4)


def test_frustum_point_lands_in_the_expected_bev_cell():
    """One-hot depth at one frustum point: the only non-empty BEV cell is the one computed by hand."""
    intrinsics, ego_from_camera = real_rig()
    view = ViewTransformerConfig(input_size=(256, 704), depth_bins=(1.0, 60.0, 1.0), context_channels=1)
    grid = BEVGridConfig()
    image_aug = resize_crop_aug(view.input_size)
    bev_aug = bev_aug_matrix(-45.0, 0.95, flip_y=False)
    cam, feature_y, feature_x, depth_bin = 3, 9, 20, 17  # CAM_BACK, a ray below the horizon, bin [18, 19) m

    # by hand: feature cell centre pixel -> original pixel -> camera ray at the bin-centre depth -> ego -> aug ego
    stride = 16
    pixel_aug = np.array([feature_x * stride + 7.5, feature_y * stride + 7.5, 1.0])
    pixel = np.linalg.inv(image_aug.double().numpy()) @ pixel_aug
    depth = 1.0 + (depth_bin + 0.5) * 1.0
    point_camera = np.linalg.inv(intrinsics[cam].double().numpy()) @ pixel * depth
    point_ego = ego_from_camera[cam].double().numpy() @ np.append(point_camera, 1.0)
    point_aug = bev_aug.double().numpy() @ point_ego
    expected_ix = math.floor((point_aug[0] + 51.2) / 0.8)
    expected_iy = math.floor((point_aug[1] + 51.2) / 0.8)
    assert -5.0 <= point_aug[2] < 3.0 and 0 <= expected_ix < 128 and 0 <= expected_iy < 128

    geometry = {
        "intrinsics": intrinsics[None],
        "ego_from_camera": ego_from_camera[None],
        "image_aug": image_aug.expand(1, 6, 3, 3),
        "bev_aug": bev_aug[None],
    }
    points = frustum_to_ego(make_frustum(view), **geometry)
    np.testing.assert_allclose(points[0, cam, depth_bin, feature_y, feature_x].numpy(), point_aug[:3], atol=1e-4)
    height, width = view.feature_size
    depth_probs = torch.zeros(1, 6, view.num_depth_bins, height, width)
    depth_probs[0, cam, depth_bin, feature_y, feature_x] = 1.0
    bev = bev_pool(depth_probs, torch.ones(1, 6, height, width, 1), make_pool_plan(points, grid))
    occupied = torch.nonzero(bev[0, 0])
    assert occupied.tolist() == [[expected_iy, expected_ix]]
    assert bev[0, 0, expected_iy, expected_ix] == 1.0
