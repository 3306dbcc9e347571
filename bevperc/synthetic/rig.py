"""The sensor rig of the synthetic world: the six cameras and the LIDAR_TOP of a real nuScenes car.

The calibration is copied from a real log, so a model trained on the synthetic world sees
the real rig's geometry. Cameras are 1600x900 pinholes (``fx = fy``); the LiDAR is a
32-ring HDL-32E-like scanner (elevations -30.67..+10.67 deg, 1084 azimuth steps, 1-70 m).
Keyframes are at 2 Hz; the cameras fire a few ms before the LiDAR keyframe.
"""

from __future__ import annotations

import numpy as np

from bevperc.geometry import make_transform

IMAGE_WIDTH, IMAGE_HEIGHT = 1600, 900

# Real nuScenes calibration (log n015-2018-07-24-11-22-45+0800, v1.0-mini), written here
# once as numbers: camera -> ego translation (m), rotation quaternion (w, x, y, z), and
# intrinsics (f, cx, cy) with fx = fy = f.
CAMERA_CALIBRATION: dict[str, tuple[tuple[float, ...], tuple[float, ...], tuple[float, float, float]]] = {
    "CAM_FRONT": ((1.700791, 0.015946, 1.510958), (0.49980154, -0.50303162, 0.49977981, -0.49737084),
                  (1266.417203, 816.267020, 491.507066)),
    "CAM_FRONT_RIGHT": ((1.550848, -0.493405, 1.495748), (0.20603479, -0.20269405, 0.68245078, -0.67136109),
                        (1260.847445, 807.968245, 495.334427)),
    "CAM_FRONT_LEFT": ((1.523878, 0.494631, 1.509328), (0.6757265, -0.67362665, 0.21214015, -0.21122827),
                       (1272.597947, 826.615493, 479.751654)),
    "CAM_BACK": ((0.028326, 0.003451, 1.579103), (0.50378727, -0.4974025, -0.49418502, 0.50454961),
                 (809.220991, 829.219600, 481.778424)),
    "CAM_BACK_LEFT": ((1.035691, 0.484795, 1.59097), (0.69241856, -0.70316194, -0.11648343, 0.11203318),
                      (1256.741481, 792.112574, 492.775747)),
    "CAM_BACK_RIGHT": ((1.014878, -0.480568, 1.562395), (0.1228098, -0.13240084, -0.70043058, 0.69049603),
                       (1259.513741, 807.252905, 501.195799)),
}
CAMERA_NAMES: tuple[str, ...] = tuple(CAMERA_CALIBRATION)
LIDAR_CALIBRATION = ((0.943713, 0.0, 1.84023), (0.70779551, -0.00649224, 0.01064621, -0.70630731))

# Camera trigger times relative to the LiDAR keyframe (us). The real rig fires the cameras
# as the LiDAR sweeps past them (up to ~45 ms apart); a tenth of that keeps every timestamp
# distinct and realistic in order while the ego moves < 5 cm between them.
CAMERA_TIME_OFFSETS_US = {
    "CAM_FRONT_LEFT": -4300, "CAM_FRONT": -3500, "CAM_FRONT_RIGHT": -2800,
    "CAM_BACK_RIGHT": -2000, "CAM_BACK": -1000, "CAM_BACK_LEFT": -50,
}
KEYFRAME_INTERVAL_US = 500_000  # 2 Hz

LIDAR_ELEVATIONS_DEG = np.linspace(-30.67, 10.67, 32)
LIDAR_AZIMUTH_STEPS = 1084
LIDAR_MAX_RANGE = 70.0
LIDAR_MIN_RANGE = 1.0


def camera_intrinsics(camera: str) -> np.ndarray:
    """3x3 intrinsics of a camera of the rig."""
    f, cx, cy = CAMERA_CALIBRATION[camera][2]
    return np.array([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]])


def ego_from_camera(camera: str) -> np.ndarray:
    """4x4 camera -> ego transform of the rig."""
    translation, rotation, _ = CAMERA_CALIBRATION[camera]
    return make_transform(np.array(rotation), np.array(translation))


def ego_from_lidar() -> np.ndarray:
    """4x4 LIDAR_TOP -> ego transform of the rig."""
    return make_transform(np.array(LIDAR_CALIBRATION[1]), np.array(LIDAR_CALIBRATION[0]))
