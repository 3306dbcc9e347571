"""Figures of what the model sees: cameras, BEV, depth, 3D LiDAR, loss engine, gestures.

Drawing functions are pure: NumPy arrays (tensors are accepted and converted) in the
bevperc box convention ``[x, y, z, w, l, h, yaw, vx, vy]`` (ego frame), images,
intrinsics and ``ego_from_camera``; they return matplotlib ``Figure`` objects that are
not attached to pyplot (safe in worker processes, no GUI backend needed).

    bevperc.viz.cameras      six cameras in the nuScenes 2x3 layout with projected 3D boxes
    bevperc.viz.bev          BEV: LiDAR, ego, boxes with heading/velocity, range rings; features, heatmaps
    bevperc.viz.depth        predicted depth distribution vs projected LiDAR depth
    bevperc.viz.lidar3d      open3d point cloud + box line sets (.ply, offscreen PNG or matplotlib fallback)
    bevperc.viz.loss_engine  task-affinity matrix with task sets, second weights over training
    bevperc.viz.gestures     gesture detections, student vs teacher heatmaps
    bevperc.viz.figures      write_sample_figures(): the standard figures of one sample to a folder;
                             sample_quality(): per-sample F1 to pick best/worst samples
    bevperc.viz.metrics      per-class AP and TP-error plots from a nuScenes metrics summary
    bevperc.viz.training     training curves (loss, learning rate, validation mAP/NDS) from a run's history
    bevperc.viz.demo         tiny synthetic data / runs so notebooks and tests work standalone
    bevperc.viz.inference    run a BEV detector on one dataset sample and collect what to draw
    bevperc.viz.samples      load a keyframe stored in the mmdet3d info layout (the real nuScenes sample)

CLI: ``python -m bevperc.viz --config CFG.yaml --checkpoint CKPT --sample TOKEN --out DIR`` (with a trainer
checkpoint also ``training_curves.png``; ``--checkpoint CKPT --out DIR`` alone writes only that).
"""

from bevperc.viz.bev import bev_features_to_rgb, plot_bev_overview, plot_bev_scene, plot_heatmap_grid
from bevperc.viz.cameras import (
    CAMERA_GRID,
    CAMERA_NAMES,
    plot_camera_views,
    project_box_centers,
    project_box_edges,
    to_display_image,
)
from bevperc.viz.colors import CLASS_COLORS, class_color, class_color_uint8
from bevperc.viz.depth import expected_depth, lidar_depth_map, plot_depth
from bevperc.viz.figures import sample_quality, save_figure, write_sample_figures
from bevperc.viz.gestures import plot_gesture_detections, plot_student_teacher_heatmaps
from bevperc.viz.loss_engine import plot_loss_engine
from bevperc.viz.training import history_from_checkpoint, plot_training_curves

__all__ = [
    "CAMERA_GRID",
    "CAMERA_NAMES",
    "CLASS_COLORS",
    "bev_features_to_rgb",
    "class_color",
    "class_color_uint8",
    "expected_depth",
    "history_from_checkpoint",
    "lidar_depth_map",
    "plot_bev_overview",
    "plot_bev_scene",
    "plot_camera_views",
    "plot_depth",
    "plot_gesture_detections",
    "plot_heatmap_grid",
    "plot_loss_engine",
    "plot_student_teacher_heatmaps",
    "plot_training_curves",
    "project_box_centers",
    "project_box_edges",
    "sample_quality",
    "save_figure",
    "to_display_image",
    "write_sample_figures",
]
