"""One scene of the synthetic world, end to end: lay it out, sense it, and make its table records.

An instance is annotated at every keyframe of the contiguous span over which it comes
within ``annotation_radius`` of the ego. At each keyframe the six cameras render
(:mod:`~bevperc.synthetic.render`) and the LiDAR sweeps (:mod:`~bevperc.synthetic.lidar`)
what is near the ego; the renders give each annotation's visible fraction, the sweep its
point count. Without images or LiDAR both are estimated
(:mod:`~bevperc.synthetic.estimates`) from the same boxes, so the tables of a world do not
depend on which sensor files are written, except for those two fields.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from bevperc.geometry import invert_transform, points_in_boxes
from bevperc.synthetic.config import SyntheticConfig, make_token, scene_rng
from bevperc.synthetic.estimates import approx_lidar_points, approx_visible_fraction
from bevperc.synthetic.layout import build_world
from bevperc.synthetic.lidar import cast_lidar
from bevperc.synthetic.render import camera_rays, encode_jpeg, render_camera
from bevperc.synthetic.rig import (
    CAMERA_NAMES,
    CAMERA_TIME_OFFSETS_US,
    KEYFRAME_INTERVAL_US,
    LIDAR_MAX_RANGE,
    ego_from_lidar,
)
from bevperc.synthetic.tables import (
    CHANNELS,
    Keyframes,
    StaticTables,
    annotation_records,
    calibrated_sensor_records,
    capture_start_s,
    link_sample_data,
    log_record,
    pose_record,
    sample_data_record,
    scene_records,
)
from bevperc.synthetic.world import RenderBox, World


@dataclass
class SceneResult:
    """Table records produced for one scene (merged in scene order by the parent)."""

    tables: dict[str, list[dict]]
    num_samples: int
    num_annotations: int


def generate_scene(cfg: SyntheticConfig, out_dir: str, scene_name: str, scene_index: int,
                   static: StaticTables) -> SceneResult:
    """Build one scene's world, write its sensor files, and return its table records."""
    n_samples = cfg.samples_per_scene
    world = build_world(cfg, scene_name, scene_index, (n_samples - 1) * KEYFRAME_INTERVAL_US / 1e6)
    key = (cfg.seed, cfg.version, scene_name)
    log = log_record(key, scene_index, world.location)
    calibrated = calibrated_sensor_records(key, static.sensor_tokens)
    keyframes = _keyframes(world, key, scene_index, n_samples, cfg.annotation_radius)
    scene, samples = scene_records(key, scene_name, world.description, log["token"], keyframes)
    sensors = SceneSensors(cfg, out_dir, world, key, log["logfile"], keyframes,
                           {channel: record["token"] for channel, record in calibrated.items()})
    for k in range(n_samples):
        sensors.sense(k)
    annotations, instances = annotation_records(key, world.instances, keyframes, sensors.visible_fraction,
                                                sensors.lidar_counts, static)
    tables = {"log": [log], "scene": [scene], "sample": samples, "sample_data": link_sample_data(sensors.sample_data),
              "ego_pose": sensors.ego_poses, "calibrated_sensor": list(calibrated.values()), "instance": instances,
              "sample_annotation": annotations}
    return SceneResult(tables, n_samples, len(annotations))


def _keyframes(world: World, key: tuple, scene_index: int, n_samples: int, radius: float) -> Keyframes:
    """The scene's keyframes at 2 Hz, and the instances annotated at each: a contiguous span within ``radius``."""
    t0_us = capture_start_s(scene_index) * 1_000_000
    times_us = [t0_us + k * KEYFRAME_INTERVAL_US for k in range(n_samples)]
    ego_poses = [world.ego_pose((t - t0_us) / 1e6) for t in times_us]
    boxes = [world.instance_boxes((t - t0_us) / 1e6) for t in times_us]
    n_inst = len(world.instances)
    in_range = np.zeros((n_samples, n_inst), dtype=bool)
    if n_inst:
        for k in range(n_samples):
            dist = np.hypot(boxes[k][:, 0] - ego_poses[k][0, 3], boxes[k][:, 1] - ego_poses[k][1, 3])
            in_range[k] = dist <= radius
    annotated = np.zeros_like(in_range)
    for i in range(n_inst):
        ks = np.nonzero(in_range[:, i])[0]
        if len(ks):
            annotated[ks[0]: ks[-1] + 1, i] = True
    return Keyframes([make_token(*key, "sample", k) for k in range(n_samples)], times_us, ego_poses, boxes, annotated)


class SceneSensors:
    """The six cameras and the LiDAR over one scene's keyframes.

    :meth:`sense` writes a keyframe's sensor files (when ``cfg.images`` / ``cfg.lidar``)
    and fills in its ego_pose and sample_data records and, per instance, the visible
    fraction and the LiDAR point count (measured, or estimated without the sensor).
    """

    def __init__(self, cfg: SyntheticConfig, out_dir: str, world: World, key: tuple, logfile: str,
                 keyframes: Keyframes, calibrated_sensor_tokens: dict[str, str]) -> None:
        self.cfg, self.out_dir, self.world, self.key, self.logfile = cfg, out_dir, world, key, logfile
        self.keyframes = keyframes
        self.calibrated_sensor_tokens = calibrated_sensor_tokens
        self.rng = scene_rng(cfg.seed, key[2], "sensors")  # LiDAR noise
        self.rays = {cam: camera_rays(cam, cfg.render_scale) for cam in CAMERA_NAMES} if cfg.images else {}
        self.clutter_global = np.array([c.box for c in world.clutter]).reshape(-1, 7)  # (M, 7)
        shape = keyframes.annotated.shape  # (S, N)
        self.visible_fraction = np.zeros(shape)
        self.lidar_counts = np.zeros(shape, dtype=np.int64)
        self.ego_poses: list[dict] = []  # ego_pose records, in sensing order
        self.sample_data: dict[str, list[dict]] = {channel: [] for channel in CHANNELS}  # per channel, in time

    def sense(self, k: int) -> None:
        """Keyframe ``k``: the cameras (fire first), then the LiDAR."""
        boxes = self.keyframes.boxes[k]
        pose = self.keyframes.ego_poses[k]
        sensed = self.cfg.images or self.cfg.lidar
        render_boxes = self.world.sensor_boxes(boxes, pose[:2, 3]) if sensed else []
        ego_from_global = invert_transform(pose, rigid=True)
        boxes_ego = boxes.copy()  # (N, 9) in the ego frame (velocities stay global)
        if len(self.world.instances):
            boxes_ego[:, :3] = boxes[:, :3] @ ego_from_global[:3, :3].T + ego_from_global[:3, 3]
            boxes_ego[:, 6] = boxes[:, 6] - math.atan2(pose[1, 0], pose[0, 0])
        self.visible_fraction[k] = self._cameras(k, render_boxes, boxes_ego, ego_from_global)
        self._lidar(k, render_boxes, boxes_ego)

    def _cameras(self, k: int, render_boxes: list[RenderBox], boxes_ego: np.ndarray,
                 ego_from_global: np.ndarray) -> np.ndarray:
        """Render and write the six images of keyframe ``k``; the instances' visible fractions ``(N,)``."""
        keyframes, n_inst = self.keyframes, len(boxes_ego)
        vis_count = np.zeros(n_inst)
        tot_count = np.zeros(n_inst)
        for cam in CAMERA_NAMES:
            ts = keyframes.times_us[k] + CAMERA_TIME_OFFSETS_US[cam]
            pose = self.world.ego_pose((ts - keyframes.times_us[0]) / 1e6)
            sd_token = make_token(*self.key, "sample_data", cam, k)
            filename = f"samples/{cam}/{self.logfile}__{cam}__{ts}.jpg"
            if self.cfg.images:
                image, visible, total = render_camera(self.world, self.rays[cam], pose, render_boxes)
                for i, c in visible.items():
                    vis_count[i] += c
                for i, c in total.items():
                    tot_count[i] += c
                with open(os.path.join(self.out_dir, filename), "wb") as handle:
                    handle.write(encode_jpeg(image, self.cfg.jpeg_quality))
            self.ego_poses.append(pose_record(sd_token, ts, pose))
            self.sample_data[cam].append(sample_data_record(sd_token, keyframes.tokens[k],
                                                            self.calibrated_sensor_tokens[cam], ts, filename))
        if self.cfg.images:
            return np.where(tot_count > 0, vis_count / np.maximum(tot_count, 1), 0.0)
        frac = np.zeros(n_inst)
        ann_idx = np.nonzero(keyframes.annotated[k])[0]
        if len(ann_idx):
            frac[ann_idx] = approx_visible_fraction(boxes_ego[ann_idx], self._clutter_ego(ego_from_global))
        return frac

    def _clutter_ego(self, ego_from_global: np.ndarray) -> np.ndarray:
        """Clutter boxes ``(M', 7)`` within 80 m, in the ego frame (occluders for the visibility estimate)."""
        boxes = self.clutter_global.copy()
        boxes[:, :3] = boxes[:, :3] @ ego_from_global[:3, :3].T + ego_from_global[:3, 3]
        boxes[:, 6] += math.atan2(ego_from_global[1, 0], ego_from_global[0, 0])
        return boxes[np.hypot(boxes[:, 0], boxes[:, 1]) < 80.0]

    def _lidar(self, k: int, render_boxes: list[RenderBox], boxes_ego: np.ndarray) -> None:
        """Sweep and write the LiDAR of keyframe ``k`` and count the points in each annotated box."""
        keyframes = self.keyframes
        ts = keyframes.times_us[k]
        pose = keyframes.ego_poses[k]
        sd_token = make_token(*self.key, "sample_data", "LIDAR_TOP", k)
        filename = f"samples/LIDAR_TOP/{self.logfile}__LIDAR_TOP__{ts}.pcd.bin"
        ann_idx = np.nonzero(keyframes.annotated[k])[0]
        if self.cfg.lidar:
            points = cast_lidar(self.world, pose, render_boxes, self.rng)
            points.tofile(os.path.join(self.out_dir, filename))
            if len(ann_idx):
                ego_lidar = ego_from_lidar()
                pts_ego = points[:, :3].astype(np.float64) @ ego_lidar[:3, :3].T + ego_lidar[:3, 3]
                near = np.hypot(boxes_ego[ann_idx, 0], boxes_ego[ann_idx, 1]) < LIDAR_MAX_RANGE + 10
                sel = ann_idx[near]
                if len(sel):
                    self.lidar_counts[k, sel] = points_in_boxes(pts_ego, boxes_ego[sel, :7]).sum(1)
        elif len(ann_idx):
            self.lidar_counts[k, ann_idx] = approx_lidar_points(boxes_ego[ann_idx], self.visible_fraction[k, ann_idx])
        self.ego_poses.append(pose_record(sd_token, ts, pose))
        self.sample_data["LIDAR_TOP"].append(sample_data_record(sd_token, keyframes.tokens[k],
                                                                self.calibrated_sensor_tokens["LIDAR_TOP"], ts,
                                                                filename))
