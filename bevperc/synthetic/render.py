"""The cameras of the synthetic world: NumPy rendering with an exact z-buffer (no photo-realism).

Every pixel's ray is intersected with the ground (:func:`~bevperc.synthetic.ground.shade_ground`;
distance haze towards the horizon colour) and the sky; each camera-facing box face is
rasterised as a near-clipped polygon whose per-pixel depth comes from the face plane,
against the per-pixel ground depth: an exact z-buffer, so occlusion is exact.

Appearance: faces are Lambert-shaded by the scene's sun; the front face (+l/2) is
lightened and the rear face darkened so heading is visible; vehicles get a dark wheel
band (cars and buses a window band), cones a white band, barriers white diagonal stripes;
every box casts a ground shadow away from the sun; each scene has its own exposure
(x0.88-1.08). Images are rendered at ``render_scale`` of 1600x900 and resized (bilinear)
when encoded (:func:`encode_jpeg`).

The renderer also counts, per annotated instance, the pixels it owns and the pixels its
faces would cover unoccluded: their ratio over the six cameras is the visible fraction
behind ``visibility_token``.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from bevperc.geometry import box_corners, invert_transform, project_to_image
from bevperc.synthetic.ground import shade_ground
from bevperc.synthetic.rig import IMAGE_HEIGHT, IMAGE_WIDTH, camera_intrinsics, ego_from_camera
from bevperc.synthetic.world import SUN_DIRECTION, RenderBox, World

SKY_ZENITH = np.array([110.0, 150.0, 210.0])
SKY_HORIZON = np.array([200.0, 212.0, 228.0])
HAZE_DISTANCE = 350.0  # m: ground colour fades to the horizon colour with exp(-d / HAZE_DISTANCE)
SHADOW_DARKENING = 0.6
SHADOW_RANGE = 80.0  # m: boxes farther from the camera cast no drawn shadow

FACE_NORMALS_LOCAL = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=np.float64)
VEHICLE_KINDS = ("car", "truck", "bus", "construction_vehicle", "trailer")
BOX_FACES = ((0, 1, 2, 3), (4, 5, 6, 7), (0, 3, 7, 4), (1, 2, 6, 5), (0, 1, 5, 4), (3, 2, 6, 7))
"""Corner indices (devkit ``Box.corners()`` order) of the faces front, rear, left, right, top, bottom."""
NEAR_PLANE = 0.05  # m, camera z below which polygons are clipped


def face_colours(rb: RenderBox, sun_direction: np.ndarray = SUN_DIRECTION) -> np.ndarray:
    """Per-face colour ``(6, 3)``: Lambert shading, front face lightened, rear face darkened."""
    cos, sin = math.cos(rb.box[6]), math.sin(rb.box[6])
    rot = np.array([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1.0]])
    normals = FACE_NORMALS_LOCAL @ rot.T
    shade = 0.62 + 0.38 * np.clip(normals @ sun_direction, 0.0, 1.0)
    colours = rb.colour[None, :] * shade[:, None]
    if rb.kind != "clutter":
        colours[0] = colours[0] * 0.55 + 255.0 * 0.45  # front: light (headlights / face)
        colours[1] = colours[1] * 0.62  # rear: dark
    return colours


def shade_box_pixels(rb: RenderBox, face: np.ndarray, local: np.ndarray, colours6: np.ndarray) -> np.ndarray:
    """Colour of the hit pixels of one box ``(P, 3)``, with per-class texture bands."""
    rgb = colours6[face]
    if rb.kind == "clutter":
        return rgb
    h = rb.box[5]
    z_rel = local[:, 2] / h + 0.5
    if rb.kind in VEHICLE_KINDS:
        wheels = (z_rel < 0.16) & (face < 4)
        rgb = np.where(wheels[:, None], rgb * 0.3, rgb)
        if rb.kind in ("car", "bus"):
            windows = (z_rel > 0.66) & (z_rel < 0.88) & (face >= 2) & (face < 4)
            rgb = np.where(windows[:, None], rgb * 0.5 + 25.0, rgb)
    elif rb.kind == "traffic_cone":
        band = (z_rel > 0.62) & (z_rel < 0.8) & (face < 4)
        rgb = np.where(band[:, None], np.float32(240.0), rgb)
    elif rb.kind == "barrier":
        # diagonal white stripes along the barrier's long (w) side
        stripes = (((local[:, 1] + local[:, 2]) % 0.8) < 0.25) & (face < 2)
        rgb = np.where(stripes[:, None], np.float32(235.0), rgb)
    return rgb


class CameraRays:
    """Per-pixel rays of a camera at the render resolution, with what a flat world fixes.

    The ego pose has only a yaw (flat ground at z = 0), so each pixel's ground hit in the
    ego frame, the sky colour and the haze are the same at every timestamp: they are
    computed once here.
    """

    def __init__(self, camera: str, scale: float) -> None:
        self.camera = camera
        self.width = max(1, int(round(IMAGE_WIDTH * scale)))
        self.height = max(1, int(round(IMAGE_HEIGHT * scale)))
        self.intrinsics = camera_intrinsics(camera)
        # pixel centres of the render grid, in full-resolution pixel coordinates
        u = (np.arange(self.width) + 0.5) * (IMAGE_WIDTH / self.width) - 0.5
        v = (np.arange(self.height) + 0.5) * (IMAGE_HEIGHT / self.height) - 0.5
        uu, vv = np.meshgrid(u, v)
        k_inv = np.linalg.inv(self.intrinsics)
        pix = np.stack([uu, vv, np.ones_like(uu)], -1)
        self.dirs = (pix @ k_inv.T).astype(np.float32)  # (H, W, 3), z = 1: ray parameter = depth
        ego_cam = ego_from_camera(camera)
        dirs_ego = self.dirs.reshape(-1, 3).astype(np.float64) @ ego_cam[:3, :3].T
        origin = ego_cam[:3, 3]
        dz = dirs_ego[:, 2]
        elev = np.clip(dz / np.linalg.norm(dirs_ego, axis=1), 0.0, 1.0)
        sky_w = np.sqrt(elev)[:, None]
        self.sky = (SKY_HORIZON * (1 - sky_w) + SKY_ZENITH * sky_w).astype(np.float32)  # (P, 3)
        t_ground = np.where(dz < -1e-6, -origin[2] / np.where(dz < -1e-6, dz, -1.0), np.inf)
        ground = t_ground < 3000.0
        self.ground_index = np.nonzero(ground)[0]
        self.ground_depth = t_ground[self.ground_index].astype(np.float32)
        self.ground_xy_ego = origin[None, :2] + t_ground[self.ground_index, None] * dirs_ego[self.ground_index, :2]
        dist = np.hypot(*(self.ground_xy_ego - origin[None, :2]).T)
        self.fog = np.exp(-dist / HAZE_DISTANCE).astype(np.float32)[:, None]


_CAMERA_RAYS_CACHE: dict[tuple[str, float], CameraRays] = {}


def camera_rays(camera: str, scale: float) -> CameraRays:
    """CameraRays per process, built once (they depend only on the rig and the scale)."""
    key = (camera, float(scale))
    if key not in _CAMERA_RAYS_CACHE:
        _CAMERA_RAYS_CACHE[key] = CameraRays(camera, scale)
    return _CAMERA_RAYS_CACHE[key]


def _clip_polygon_near(poly: np.ndarray, near: float = NEAR_PLANE) -> np.ndarray:
    """Sutherland-Hodgman clip of a camera-frame polygon ``(K, 3)`` to ``z >= near``."""
    out = []
    k = len(poly)
    for i in range(k):
        a, b = poly[i], poly[(i + 1) % k]
        a_in, b_in = a[2] >= near, b[2] >= near
        if a_in:
            out.append(a)
        if a_in != b_in:
            f = (near - a[2]) / (b[2] - a[2])
            out.append(a + f * (b - a))
    return np.array(out).reshape(-1, 3)


def _fill_polygon_pixels(poly_cam: np.ndarray, K: np.ndarray, sx: float, sy: float, W: int, H: int) -> np.ndarray:
    """Flat render-grid indices covered by a camera-frame polygon ``(k, 3)`` (near-clipped first)."""
    import cv2

    if (poly_cam[:, 2] < NEAR_PLANE).any():
        poly_cam = _clip_polygon_near(poly_cam)
        if len(poly_cam) < 3:
            return np.zeros(0, dtype=np.int64)
    pix, _ = project_to_image(poly_cam, K)
    ru = (pix[:, 0] + 0.5) * sx - 0.5  # render-grid coordinates (pixel centres at integers)
    rv = (pix[:, 1] + 0.5) * sy - 0.5
    u0, u1 = max(0, int(math.floor(ru.min()))), min(W - 1, int(math.ceil(ru.max())))
    v0, v1 = max(0, int(math.floor(rv.min()))), min(H - 1, int(math.ceil(rv.max())))
    if u0 > u1 or v0 > v1:
        return np.zeros(0, dtype=np.int64)
    mask = np.zeros((v1 - v0 + 1, u1 - u0 + 1), np.uint8)
    pts = np.round(np.stack([ru - u0, rv - v0], -1) * 16).astype(np.int32)
    cv2.fillConvexPoly(mask, pts, 1, lineType=cv2.LINE_8, shift=4)
    vv, uu = np.nonzero(mask)
    return (vv + v0) * W + (uu + u0)


class _Frame:
    """One camera image being rendered: the camera's pose and grid, the z-buffer, the owners, the pixels."""

    def __init__(self, rays: CameraRays, global_from_ego: np.ndarray, with_image: bool) -> None:
        self.rays = rays
        self.cam_from_global = invert_transform(global_from_ego @ ego_from_camera(rays.camera), rigid=True)
        self.K = rays.intrinsics
        self.H, self.W = rays.height, rays.width
        self.sx, self.sy = self.W / IMAGE_WIDTH, self.H / IMAGE_HEIGHT
        self.depth = np.full(self.H * self.W, np.inf, np.float32)  # (H * W,) camera z of the nearest hit
        self.owner = np.full(self.H * self.W, -1, np.int32)  # (H * W,) index of the box owning the pixel, or -1
        self.image: Optional[np.ndarray] = rays.sky.copy() if with_image else None  # (H * W, 3) float32 RGB

    def fill(self, poly_cam: np.ndarray) -> np.ndarray:
        """Flat indices of the render grid covered by a camera-frame polygon ``(k, 3)``."""
        return _fill_polygon_pixels(poly_cam, self.K, self.sx, self.sy, self.W, self.H)


def render_camera(world: World, rays: CameraRays, global_from_ego: np.ndarray, boxes: list[RenderBox],
                  with_image: bool = True) -> tuple[Optional[np.ndarray], dict[int, int], dict[int, int]]:
    """Render one camera image with an exact per-pixel depth buffer.

    Ground and sky are ray cast per pixel; each camera-facing box face is rasterised as
    a polygon (near-plane clipped) and its per-pixel depth comes from the face plane
    (``t = (n . p0) / (n . ray)``), so occlusion is exact. Returns the RGB image
    ``(H, W, 3)`` uint8 at render resolution (None when ``with_image`` is False), and
    per annotated instance the number of pixels it owns (visible) and the number its
    faces cover ignoring other boxes (unoccluded).
    """
    frame = _Frame(rays, global_from_ego, with_image)
    if with_image:
        gidx = rays.ground_index
        gpts = rays.ground_xy_ego @ global_from_ego[:2, :2].T + global_from_ego[:2, 3]
        gcol, _ = shade_ground(world, gpts)
        frame.image[gidx] = gcol * rays.fog + SKY_HORIZON.astype(np.float32) * (1 - rays.fog)
        frame.depth[gidx] = rays.ground_depth
    candidates, all_corners_cam = _cull_boxes(frame, boxes)
    if with_image:
        _draw_shadows(world, frame, boxes, candidates)
    unoccluded: dict[int, int] = {}
    for bi in candidates:
        _draw_box(world, frame, boxes[bi], bi, all_corners_cam[bi], unoccluded)
    visible: dict[int, int] = {}
    owned = frame.owner[frame.owner >= 0]
    if len(owned):
        counts = np.bincount(owned, minlength=len(boxes))
        for bi in np.nonzero(counts)[0]:
            inst = boxes[bi].instance
            if inst >= 0:
                visible[inst] = visible.get(inst, 0) + int(counts[bi])
    out = None
    if with_image:
        out = np.clip(frame.image * world.exposure, 0, 255).reshape(frame.H, frame.W, 3).astype(np.uint8)
    return out, visible, unoccluded


def _cull_boxes(frame: _Frame, boxes: list[RenderBox]) -> tuple[np.ndarray, np.ndarray]:
    """Boxes with a corner in front of the camera and a projected extent in the image.

    Returns their indices ``(C,)`` and the corners of all boxes in the camera frame ``(B, 8, 3)``.
    """
    if not boxes:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 8, 3))
    cam_from_global = frame.cam_from_global
    all_corners_cam = (box_corners(np.stack([rb.box[:7] for rb in boxes])) @ cam_from_global[:3, :3].T
                       + cam_from_global[:3, 3])
    z = all_corners_cam[..., 2]
    in_front = (z > NEAR_PLANE).any(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        pix = all_corners_cam @ frame.K.T
        u = pix[..., 0] / pix[..., 2]
        v = pix[..., 1] / pix[..., 2]
    straddles = (z <= NEAR_PLANE).any(1)
    overlaps = ((u.min(1) < IMAGE_WIDTH) & (u.max(1) >= 0) & (v.min(1) < IMAGE_HEIGHT) & (v.max(1) >= 0))
    return np.nonzero(in_front & (straddles | overlaps))[0], all_corners_cam


def _draw_shadows(world: World, frame: _Frame, boxes: list[RenderBox], candidates: np.ndarray) -> None:
    """Darken the ground under and behind (away from the sun) each box: contact shadows ground objects."""
    import cv2

    sun = world.sun_direction
    cast = -sun[:2] / max(sun[2], 0.2)  # ground offset per metre of height
    cam_from_global = frame.cam_from_global
    cam_xy = invert_transform(cam_from_global, rigid=True)[:2, 3]
    in_shadow = np.zeros(len(frame.depth), dtype=bool)  # overlapping shadows darken once
    for bi in candidates:
        rb = boxes[bi]
        if math.hypot(rb.box[0] - cam_xy[0], rb.box[1] - cam_xy[1]) > SHADOW_RANGE:
            continue
        foot = box_corners(rb.box[None, :7])[0][[3, 2, 6, 7], :2]  # bottom face, xy
        # the shadow of a box on the ground: hull of its footprint and the footprint moved by h * cast
        hull = cv2.convexHull(np.concatenate([foot, foot + rb.box[5] * cast], 0).astype(np.float32))[:, 0, :]
        poly = np.concatenate([hull.astype(np.float64), np.full((len(hull), 1), 0.01)], 1)
        flat = frame.fill(poly @ cam_from_global[:3, :3].T + cam_from_global[:3, 3])
        if len(flat) == 0:
            continue
        in_shadow[flat] = True
    in_shadow &= np.isfinite(frame.depth)  # ground pixels only
    frame.image[in_shadow] *= SHADOW_DARKENING


def _draw_box(world: World, frame: _Frame, rb: RenderBox, bi: int, corners_cam: np.ndarray,
              unoccluded: dict[int, int]) -> None:
    """Rasterise the camera-facing faces of box ``bi`` (corners ``(8, 3)`` in the camera frame) into ``frame``.

    Each face's per-pixel depth comes from its plane; pixels nearer than the z-buffer take
    the box (and, with an image, its shaded colour). ``unoccluded[instance]`` gains the
    pixels the faces cover whatever is in front.
    """
    rot_cg = frame.cam_from_global[:3, :3]
    dirs_flat = frame.rays.dirs.reshape(-1, 3)
    up_cam = rot_cg[:, 2]  # global +z in the camera frame
    cos, sin = math.cos(rb.box[6]), math.sin(rb.box[6])
    rot_cb = rot_cg @ np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
    centre_cam = rot_cg @ rb.box[:3] + frame.cam_from_global[:3, 3]
    colours6 = face_colours(rb, world.sun_direction).astype(np.float32) if frame.image is not None else None
    for f in range(5):  # the bottom face is never seen from above the ground
        normal = rot_cb @ FACE_NORMALS_LOCAL[f]
        plane_c = float(normal @ corners_cam[BOX_FACES[f][0]])
        if plane_c >= -1e-9:  # back face (camera behind the face plane)
            continue
        flat = frame.fill(corners_cam[list(BOX_FACES[f])])
        if len(flat) == 0:
            continue
        d = dirs_flat[flat]
        denom = d @ normal.astype(np.float32)
        t = np.where(denom < -1e-9, plane_c / np.minimum(denom, -1e-9), np.inf).astype(np.float32)
        t = np.maximum(t, NEAR_PLANE)
        if rb.instance >= 0:
            unoccluded[rb.instance] = unoccluded.get(rb.instance, 0) + len(flat)
        closer = t < frame.depth[flat]
        if not closer.any():
            continue
        flat, t, d = flat[closer], t[closer], d[closer]
        frame.depth[flat] = t
        frame.owner[flat] = bi
        if frame.image is not None:
            hit = t[:, None] * d
            local = np.stack([
                hit @ rot_cb[:, 0].astype(np.float32) - float(centre_cam @ rot_cb[:, 0]),
                hit @ rot_cb[:, 1].astype(np.float32) - float(centre_cam @ rot_cb[:, 1]),
                hit @ up_cam.astype(np.float32) - float(centre_cam @ up_cam),
            ], -1)
            frame.image[flat] = shade_box_pixels(rb, np.full(len(flat), f), local, colours6)


def encode_jpeg(image_rgb: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of an RGB image ``(H, W, 3)`` uint8, resized (bilinear) to 1600x900 first if needed."""
    import cv2

    # BGR for OpenCV by cvtColor, before the resize (it acts per channel): a reversed-channel view would make
    # imencode copy the full-size image element by element, several times the cost of the encoding itself
    bgr = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    full = cv2.resize(bgr, (IMAGE_WIDTH, IMAGE_HEIGHT), interpolation=cv2.INTER_LINEAR) \
        if bgr.shape[:2] != (IMAGE_HEIGHT, IMAGE_WIDTH) else bgr
    ok, buf = cv2.imencode(".jpg", full, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()
