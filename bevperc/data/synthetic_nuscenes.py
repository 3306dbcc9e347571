"""Alias of :mod:`bevperc.synthetic`, the synthetic nuScenes world (its old home, as one module).

Kept so that ``from bevperc.data.synthetic_nuscenes import ...`` keeps working for every
public name the module had; new code imports from ``bevperc.synthetic`` and its modules.
(``rigid_inverse`` is gone: ``bevperc.geometry.invert_transform(t, rigid=True)`` is the same.)
"""

from bevperc.synthetic.config import (  # noqa: F401
    SyntheticConfig,
    devkit_splits,
    make_token,
    scene_names_for,
    scene_rng,
)
from bevperc.synthetic.estimates import approx_lidar_points, approx_visible_fraction  # noqa: F401
from bevperc.synthetic.generate import GENERATOR_VERSION, generate  # noqa: F401
from bevperc.synthetic.ground import shade_ground  # noqa: F401
from bevperc.synthetic.layout import DENSITY_CALIBRATION, build_world  # noqa: F401
from bevperc.synthetic.lidar import cast_lidar, lidar_rays, ray_box_hits  # noqa: F401
from bevperc.synthetic.render import (  # noqa: F401
    BOX_FACES,
    FACE_NORMALS_LOCAL,
    HAZE_DISTANCE,
    NEAR_PLANE,
    SHADOW_DARKENING,
    SHADOW_RANGE,
    SKY_HORIZON,
    SKY_ZENITH,
    VEHICLE_KINDS,
    CameraRays,
    face_colours,
    render_camera,
    shade_box_pixels,
)
from bevperc.synthetic.rig import (  # noqa: F401
    CAMERA_CALIBRATION,
    CAMERA_NAMES,
    CAMERA_TIME_OFFSETS_US,
    IMAGE_HEIGHT,
    IMAGE_WIDTH,
    KEYFRAME_INTERVAL_US,
    LIDAR_AZIMUTH_STEPS,
    LIDAR_CALIBRATION,
    LIDAR_ELEVATIONS_DEG,
    LIDAR_MAX_RANGE,
    LIDAR_MIN_RANGE,
    camera_intrinsics,
    ego_from_camera,
    ego_from_lidar,
)
from bevperc.synthetic.scene import SceneResult, generate_scene  # noqa: F401
from bevperc.synthetic.taxonomy import (  # noqa: F401
    ATTRIBUTES,
    CATEGORIES,
    CLASS_COLOURS,
    CLUTTER_COLOURS,
    LOCATIONS,
    OBJECT_KINDS,
    TREE_CROWN_COLOUR,
    TREE_TRUNK_COLOUR,
    VISIBILITY_LEVELS,
    ObjectKind,
)
from bevperc.synthetic.world import (  # noqa: F401
    SEGMENT_TYPES,
    SUN_DIRECTION,
    ClutterBox,
    Instance,
    RenderBox,
    Road,
    SpeedProfile,
    World,
)
