"""A synthetic nuScenes world, written in the exact nuScenes format the real devkit loads.

No real nuScenes can be downloaded here, so bevperc makes its own: ``generate(out_dir)``
writes ``<out_dir>/<version>/*.json`` (the 13 nuScenes tables), ``samples/CAM_*/*.jpg``
(1600x900), ``samples/LIDAR_TOP/*.pcd.bin`` (float32 x, y, z, intensity, ring) and
``maps/*.png``; ``nuscenes.nuscenes.NuScenes(version, out_dir)`` loads it unpatched and
``nuscenes.eval.detection.evaluate.DetectionEval`` evaluates against it. The command line is
``python data_tools/synthetic_nuscenes.py``.

Each scene is a flat road with lanes, parking, sidewalks and road-side segments; tracked
instances of all 10 detection classes move along it or stand still, among unannotated
clutter; the real nuScenes rig senses it with NumPy ray casting (no photo-realism, strongly
distinct class colours). Everything is deterministic per seed, independent of the number
of workers.

Modules, in the order a world is made:

``config``     :class:`SyntheticConfig` (the options), scene names, tokens, per-scene random streams
``rig``        the six cameras and the LIDAR_TOP (real calibration), keyframe timing
``taxonomy``   nuScenes categories, attributes, visibility levels, object kinds, class colours
``world``      :class:`World`: the road, speed profiles, instances, clutter, boxes at any time
``layout``     :func:`build_world`: the road, the ego and the placers of every object
``ground``     ground colour and LiDAR intensity of the road surface
``render``     camera images with an exact z-buffer, and the visible fraction of each box
``lidar``      the LiDAR sweep (ray cast), whose points give ``num_lidar_pts``
``estimates``  visibility and ``num_lidar_pts`` estimated without images / LiDAR
``tables``     the nuScenes table records, and :func:`write_tables` (the one writer of table files)
``scene``      one scene end to end: world, sensors, records
``generate``   :func:`generate`: all scenes in worker processes, the tables, the maps, ``dataset_info.json``

``bevperc.data.synthetic_nuscenes`` is the old home of all of this, kept as an alias.
"""

from bevperc.synthetic.config import SyntheticConfig
from bevperc.synthetic.generate import GENERATOR_VERSION, generate
from bevperc.synthetic.layout import build_world
from bevperc.synthetic.rig import (
    CAMERA_NAMES,
    IMAGE_HEIGHT,
    IMAGE_WIDTH,
    LIDAR_AZIMUTH_STEPS,
    LIDAR_MAX_RANGE,
    camera_intrinsics,
    ego_from_camera,
    ego_from_lidar,
)
from bevperc.synthetic.tables import write_tables
from bevperc.synthetic.taxonomy import CLASS_COLOURS, OBJECT_KINDS
from bevperc.synthetic.world import World

__all__ = [
    "CAMERA_NAMES", "CLASS_COLOURS", "GENERATOR_VERSION", "IMAGE_HEIGHT", "IMAGE_WIDTH", "LIDAR_AZIMUTH_STEPS",
    "LIDAR_MAX_RANGE", "OBJECT_KINDS", "SyntheticConfig", "World", "build_world", "camera_intrinsics",
    "ego_from_camera", "ego_from_lidar", "generate", "write_tables",
]
