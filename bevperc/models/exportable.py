"""The BEV detector as an ONNX-exportable module: plain tensors in, a tuple of head maps out.

``ExportableBEVDetector(model, rig)`` recomposes ``BEVDetector.forward`` from its public parts
(``backbone``, ``neck``, ``view_transformer``, ``bev_encoder``, ``head``) and swaps only the
pooling: the custom autograd splat of ``bev_pool`` becomes ``bev_pool_onnx`` (Gather, Mul,
ScatterElements add). Two calibration modes:

* **fixed rig** (``rig`` given): the rig's ``PoolPlan`` -- which BEV cell each frustum point
  lands in, the kept points, their order -- is computed once here, with the same
  ``make_pool_plan`` as PyTorch inference, and stored as constant index tensors (graph
  constants). Inputs: ``images`` only.
* **calibration as inputs** (``rig=None``): inputs ``images``, ``intrinsics``,
  ``ego_from_camera``, ``image_aug``; the frustum goes to the ego frame in the graph
  (``LSSViewTransformer.geometry``, float64) and every frustum point is kept, those outside
  the grid routed to a dummy cell that is dropped (no data-dependent shapes).

``bev_aug`` is the identity in both (deployment does not augment). Outputs, in
``output_names`` order: ``"<group>.<branch>"`` ``[B, c, ny, nx]`` for every class group and
branch (``BEVDetector.forward``'s keys), then ``"depth"`` (depth logits ``[B, N, D, h, w]``), then,
where the image head runs at inference (``lift_scores`` or ``heading``), ``"image_heatmap"``
``[B * N, classes (+ 2), h, w]`` (read by ``decode.direction_from_image``).
"""

from __future__ import annotations

import torch
from torch import nn

from bevperc.models.bev_pool import bev_pool_onnx, make_pool_plan, ray_of_point, voxel_index
from bevperc.models.detector import BEVDetector

CALIBRATION_INPUTS = ("intrinsics", "ego_from_camera", "image_aug")
"""Graph inputs after ``images`` in calibration-as-inputs mode (``bevperc.data`` batch keys and shapes)."""
CALIBRATION_MODES = ("fixed-rig", "inputs")


def rig_batch(rig: dict[str, torch.Tensor], batch_size: int = 1) -> dict[str, torch.Tensor]:
    """The geometry keys of a model batch for one rig ``{key: [N, ...]}`` repeated ``batch_size`` times.

    ``bev_aug`` is the identity. Float64, so the geometry is the one PyTorch inference computes.
    """
    batch = {key: rig[key].to(torch.float64).expand(batch_size, *rig[key].shape) for key in CALIBRATION_INPUTS}
    batch["bev_aug"] = torch.eye(4, dtype=torch.float64).expand(batch_size, 4, 4)
    return batch


class ExportableBEVDetector(nn.Module):
    """``forward(images, [intrinsics, ego_from_camera, image_aug]) -> tuple of head maps`` (see module doc).

    Args:
        model: a built (and loaded) ``BEVDetector``; its modules are shared, not copied.
        rig: fixed-rig mode: ``{"intrinsics": [N, 3, 3], "ego_from_camera": [N, 4, 4],
            "image_aug": [N, 3, 3]}``; None: calibration-as-inputs mode.
    """

    def __init__(self, model: BEVDetector, rig: dict[str, torch.Tensor] | None = None, cameras: int = 6) -> None:
        super().__init__()
        self.model = model
        self.calibration = "fixed-rig" if rig is not None else "inputs"
        view = model.view_transformer
        if rig is not None:
            cameras = int(rig["intrinsics"].shape[0])
            plan = make_pool_plan(view.geometry(rig_batch(rig)), view.grid_cfg)
            rays = view.ray_inputs(rig_batch(rig))  # [N, RAY_FEATURES, h, w] or None: constants of the rig
            point_ids, ray_ids, cell_ids = plan.point_ids, plan.ray_ids, plan.cell_ids.unsqueeze(0)
        else:  # every frustum point of the N cameras; cells are computed in the graph
            depth_bins, height, width = view.frustum.shape[:3]
            point_ids = torch.arange(cameras * depth_bins * height * width)
            ray_ids, cell_ids = ray_of_point(point_ids, depth_bins, height * width), None
            rays = None  # computed in the graph from the calibration inputs
        self.cameras = cameras
        self.register_buffer("point_ids", point_ids.unsqueeze(0), persistent=False)
        self.register_buffer("ray_ids", ray_ids.unsqueeze(0), persistent=False)
        self.register_buffer("cell_ids", cell_ids, persistent=False)
        self.register_buffer("rays", rays, persistent=False)
        self.output_names = self._output_names()

    @property
    def input_names(self) -> list[str]:
        return ["images"] if self.calibration == "fixed-rig" else ["images", *CALIBRATION_INPUTS]

    @property
    def num_points(self) -> int:
        """Points splatted per sample: the rig's kept points, or every frustum point."""
        return int(self.point_ids.shape[1])

    def _output_names(self) -> list[str]:
        """``BEVDetector.forward``'s keys in its order, found by running the head on a zero BEV map."""
        view, encoder = self.model.view_transformer, self.model.bev_encoder
        grid = view.grid_cfg
        bev = torch.zeros(1, view.out_channels, grid.num_y, grid.num_x, device=self.point_ids.device)
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            names = list(self.model.head(encoder(bev)))
        self.model.train(was_training)
        image_head = view.image_head
        runs_image_head = image_head is not None and (view.lift_scores or image_head.heading)
        return [*names, "depth", *(["image_heatmap"] if runs_image_head else [])]

    def forward(
        self, images: torch.Tensor, intrinsics: torch.Tensor | None = None, ego_from_camera: torch.Tensor | None = None,
        image_aug: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """
        Args:
            images: ``[B, N, 3, H, W]`` normalised network input.
            intrinsics, ego_from_camera, image_aug: ``[B, N, 3, 3]``, ``[B, N, 4, 4]``, ``[B, N, 3, 3]``
                (calibration-as-inputs mode only).
        Returns:
            the maps of ``output_names``.
        """
        model = self.model
        cams = self.cameras
        features = model.neck(model.backbone(images.flatten(0, 1)))  # [B*N, C, h, w]
        point_ids, ray_ids, cell_ids, rays = self._geometry_for(images.shape[0], intrinsics, ego_from_camera, image_aug)
        depth_logits, depth_probs, context, image_logits = model.view_transformer.lift(features, cams, rays)
        grid = model.view_transformer.grid_cfg
        bev = bev_pool_onnx(depth_probs, context, point_ids, ray_ids, cell_ids, grid.num_y, grid.num_x)
        outputs = model.head(model.bev_encoder(bev)) | {"depth": depth_logits, "image_heatmap": image_logits}
        return tuple(outputs[name] for name in self.output_names)

    def _geometry_for(
        self, batch_size: int, intrinsics: torch.Tensor | None, ego_from_camera: torch.Tensor | None,
        image_aug: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(point_ids, ray_ids, cell_ids)`` ``[1 or B, P]`` for ``bev_pool_onnx``, and the depth net's
        ``ray_inputs`` ``[B * N, RAY_FEATURES, h, w]`` (None when the model has none)."""
        if self.calibration == "fixed-rig":
            rays = None if self.rays is None else self.rays.repeat(batch_size, 1, 1, 1)
            return self.point_ids, self.ray_ids, self.cell_ids, rays
        if intrinsics is None or ego_from_camera is None or image_aug is None:
            raise ValueError(f"ExportableBEVDetector (calibration as inputs): give images and {CALIBRATION_INPUTS}")
        view = self.model.view_transformer
        eye = torch.eye(4, dtype=intrinsics.dtype, device=intrinsics.device)
        batch = {"intrinsics": intrinsics, "ego_from_camera": ego_from_camera, "image_aug": image_aug,
                 "bev_aug": eye.expand(intrinsics.shape[0], 4, 4)}
        points = view.geometry(batch)  # [B, N, D, h, w, 3] float64
        cell, valid = voxel_index(points.reshape(1, -1, 3), view.grid_cfg)  # as one "sample": no batch offset
        dropped = view.grid_cfg.num_y * view.grid_cfg.num_x
        cell_ids = torch.where(valid, cell, torch.full_like(cell, dropped)).reshape(intrinsics.shape[0], -1)
        return self.point_ids, self.ray_ids, cell_ids, view.ray_inputs(batch)
