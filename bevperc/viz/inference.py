"""Run a BEV detector on one dataset sample and collect everything the figures draw.

This is the only part of ``bevperc.viz`` that touches a model or a dataset; the drawing
functions take the plain arrays of :class:`SamplePrediction`.

Frames: the sample is read with ``train=False`` (no augmentation), so ``bev_aug`` is the
identity and the augmented ego frame (where the BEV grid and ``gt_boxes`` live) is the
ego frame. Should a dataset still apply a BEV augmentation, GT boxes are mapped back to the
ego frame with its inverse; the BEV grids then stay in the augmented frame (noted in
``SamplePrediction.notes``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from bevperc.viz.cameras import denormalize_imagenet


@dataclass
class SamplePrediction:
    """One sample's inputs, ground truth, predictions and intermediate maps as NumPy arrays."""

    sample_token: str
    images: np.ndarray  # (N_cam, H, W, 3) uint8: the network input images (augmented/resized)
    intrinsics: np.ndarray  # (N_cam, 3, 3) original cameras
    ego_from_camera: np.ndarray  # (N_cam, 4, 4)
    image_aug: np.ndarray  # (N_cam, 3, 3) original pixel -> input pixel
    bev_aug: np.ndarray  # (4, 4)
    gt_boxes: np.ndarray  # (M, 9) ego frame
    gt_labels: np.ndarray  # (M,)
    pred_boxes: np.ndarray  # (K, 9) ego frame
    pred_scores: np.ndarray  # (K,)
    pred_labels: np.ndarray  # (K,)
    bev_features: np.ndarray  # (C, ny, nx) BEV encoder output (what the head sees)
    heatmaps: np.ndarray  # (K_cls, ny, nx) sigmoid heatmaps, channels in heatmap_class_names order
    heatmap_class_names: list[str]
    depth_probs: np.ndarray  # (N_cam, D, h, w) softmax depth distribution
    depth_bins: np.ndarray  # (D,) bin centres in metres
    bev_range: tuple[float, float, float, float]  # (x_min, x_max, y_min, y_max)
    lidar_points: np.ndarray | None = None  # (P, 4) ego frame x, y, z, intensity
    notes: list[str] = field(default_factory=list)

    def figure_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`bevperc.viz.write_sample_figures` (after ``out_dir``)."""
        return dict(
            images=self.images, intrinsics=self.intrinsics, ego_from_camera=self.ego_from_camera,
            gt_boxes=self.gt_boxes, gt_labels=self.gt_labels, pred_boxes=self.pred_boxes,
            pred_scores=self.pred_scores, pred_labels=self.pred_labels, lidar_points=self.lidar_points,
            image_aug=self.image_aug, bev_features=self.bev_features, heatmaps=self.heatmaps,
            heatmap_class_names=self.heatmap_class_names, depth_probs=self.depth_probs, depth_bins=self.depth_bins,
            bev_range=self.bev_range,
        )  # fmt: skip


def find_sample_index(dataset: Any, token: str) -> int:
    """Index of the sample with ``token`` in a ``NuScenesBEVDataset``; a clear error listing a few tokens otherwise."""
    for index, sample in enumerate(dataset.samples):
        if sample["token"] == token:
            return index
    examples = [sample["token"] for sample in dataset.samples[:5]]
    raise KeyError(f"sample token {token!r} not in {dataset.info_path} ({len(dataset)} samples; e.g. {examples})")


def load_sample_lidar(dataset: Any, index: int) -> np.ndarray | None:
    """Ego-frame LiDAR points ``(P, 4)`` of a dataset sample, or None when its info has no LiDAR entry/file."""
    from bevperc.data.dataset import load_lidar_points
    from bevperc.data.infos import dataroot_file
    from bevperc.geometry import transform_points

    lidar = dataset.samples[index].get("lidar")
    if not lidar:
        return None
    path = dataroot_file(dataset.dataroot, lidar["path"], f"{dataset.info_path}: sample {index} lidar")
    if not path.is_file():
        return None
    points = load_lidar_points(path)[:, :4].astype(np.float64)
    points[:, :3] = transform_points(np.asarray(lidar["ego_from_lidar"], dtype=np.float64), points[:, :3])
    return points


@torch.no_grad()
def predict_sample(model: Any, dataset: Any, index: int, device: str | torch.device = "cpu") -> SamplePrediction:
    """Run ``model`` (a ``BEVDetector``) on ``dataset[index]`` and gather arrays for the figures.

    BEV features are taken with a forward hook on ``model.bev_encoder`` (its output).
    """
    from bevperc.data.dataset import collate_bev
    from bevperc.geometry import transform_boxes  # handles the scale and flips of bev_aug
    from bevperc.models.lift import depth_bin_centres

    item = dataset[index]
    batch = collate_bev([item])
    batch = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    captured: dict[str, torch.Tensor] = {}
    hook = model.bev_encoder.register_forward_hook(lambda _m, _i, output: captured.__setitem__("bev", output))
    was_training = model.training
    model.eval()
    try:
        outputs = model(batch)
        detections = model.decode(outputs, batch)[0]
    finally:
        hook.remove()
        model.train(was_training)

    head_cfg, grid_cfg, view_cfg = model.head.head_cfg, model.head.grid_cfg, model.view_transformer.view_cfg
    heatmaps, names = [], []
    for group_name, group in zip(head_cfg.group_names, head_cfg.class_groups):
        heatmaps.append(torch.sigmoid(outputs[f"{group_name}.heatmap"][0].float()))
        names += list(group)
    bev_aug = item["bev_aug"].double()
    notes = []
    gt_boxes = item["gt_boxes"]
    if not torch.allclose(bev_aug, torch.eye(4, dtype=torch.float64)):
        gt_boxes = transform_boxes(torch.linalg.inv(bev_aug).float(), gt_boxes)
        notes.append("dataset applied a BEV augmentation: BEV feature/heatmap panels are in the augmented frame")
    bev = captured["bev"]
    if isinstance(bev, (list, tuple)):
        bev = bev[0]
    return SamplePrediction(
        sample_token=item["sample_token"],
        images=np.stack([denormalize_imagenet(image) for image in item["images"]]),
        intrinsics=item["intrinsics"].numpy().astype(np.float64),
        ego_from_camera=item["ego_from_camera"].numpy().astype(np.float64),
        image_aug=item["image_aug"].numpy().astype(np.float64),
        bev_aug=bev_aug.numpy(),
        gt_boxes=gt_boxes.numpy().astype(np.float64),
        gt_labels=item["gt_labels"].numpy(),
        pred_boxes=detections["boxes"].cpu().numpy().astype(np.float64),
        pred_scores=detections["scores"].cpu().numpy().astype(np.float64),
        pred_labels=detections["labels"].cpu().numpy(),
        bev_features=bev[0].float().cpu().numpy(),
        heatmaps=torch.cat(heatmaps).cpu().numpy(),
        heatmap_class_names=names,
        depth_probs=outputs["depth"][0].float().softmax(dim=1).cpu().numpy(),
        depth_bins=depth_bin_centres(view_cfg).numpy(),
        bev_range=(*grid_cfg.x_range, *grid_cfg.y_range),
        lidar_points=load_sample_lidar(dataset, index),
        notes=notes,
    )


def load_model_and_data(config_path: str | Path, checkpoint: str | Path | None, split: str | None = None,
                        dataroot: str | None = None, overrides: Sequence[str] = ()) -> tuple[Any, Any]:
    """Build ``(BEVDetector, NuScenesBEVDataset)`` from a run config (``bevperc.config.Config`` YAML).

    Weights come from ``bevperc.inference.load_detector`` (``weights_only`` load; EMA weights
    when present and ``eval.use_ema``). Without a checkpoint the model keeps its seeded
    random initialisation (useful to check the plumbing). The dataset is read with
    ``train=False``: no augmentation.
    """
    from bevperc.config import load_run_config
    from bevperc.data import NuScenesBEVDataset
    from bevperc.models import build_detector

    overrides = list(overrides) + ([f"data.dataroot={dataroot}"] if dataroot is not None else [])
    cfg = load_run_config(config_path, overrides)
    if checkpoint is not None:
        from bevperc.inference import load_detector

        model = load_detector(cfg, checkpoint)
    else:
        torch.manual_seed(0)
        model = build_detector(cfg.model)
    model.eval()
    dataset = NuScenesBEVDataset(cfg.data, split or cfg.data.val_split, train=False)
    return model, dataset
