"""Image and BEV augmentation as explicit matrices.

Every augmentation is a matrix that the model's geometry consumes, so the lift stays
exact: ``image_aug`` (3x3, original pixel -> augmented pixel) for the images and
``bev_aug`` (4x4, ego -> augmented ego) for the BEV. Boxes are moved with
:func:`bevperc.geometry.transform_boxes`, the same function used for frame changes.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from bevperc.data.config import BEVAugConfig, ImageAugConfig


def _affine(a: float = 1.0, b: float = 0.0, c: float = 0.0, d: float = 0.0, e: float = 1.0, f: float = 0.0) -> np.ndarray:
    return np.array([[a, b, c], [d, e, f], [0.0, 0.0, 1.0]])


def sample_image_aug(
    rng: np.random.Generator | None,
    original_size: tuple[int, int],
    input_size: tuple[int, int],
    cfg: ImageAugConfig,
) -> tuple[float, np.ndarray]:
    """Draw one image augmentation.

    Args:
        rng: random generator, or None for the deterministic test-time transform.
        original_size: (width, height) of the camera image.
        input_size: (H, W) of the network input.

    Returns:
        ``(resize, crop_flip_rotate)``: the resize factor, and the 3x3 affine that maps a
        pixel of the resized image to the network input. The full ``image_aug`` is
        ``crop_flip_rotate @ diag(resize, resize, 1)``.
    """
    width, height = original_size
    input_h, input_w = input_size
    base = input_w / width
    if rng is None:
        resize = base  # test time: the image width fits the input width exactly
        crop_fraction = float(np.mean(cfg.bottom_crop_range))
        flip, angle = False, 0.0
    else:
        resize = base * rng.uniform(*cfg.resize_range)
        crop_fraction = rng.uniform(*cfg.bottom_crop_range)
        flip = bool(rng.uniform() < cfg.flip_prob)
        angle = rng.uniform(*cfg.rotate_range)
    resized_w, resized_h = width * resize, height * resize
    crop_top = max(0.0, (1.0 - crop_fraction) * (resized_h - input_h))
    crop_left = max(0.0, (resized_w - input_w) / 2.0) if rng is None else rng.uniform(0, max(0.0, resized_w - input_w))
    transform = _affine(c=-crop_left, f=-crop_top)
    if flip:
        transform = _affine(a=-1.0, c=input_w) @ transform
    if angle:
        # rotate about the input image centre
        cx, cy = input_w / 2.0, input_h / 2.0
        cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        rotation = _affine(a=cos, b=sin, d=-sin, e=cos)
        transform = _affine(c=cx, f=cy) @ rotation @ _affine(c=-cx, f=-cy) @ transform
    return resize, transform


def draft_size(original_size: tuple[int, int], input_size: tuple[int, int], cfg: ImageAugConfig) -> tuple[int, int]:
    """(width, height) the camera JPEGs are decoded at: the largest the image resize can ask for.

    JPEGs are decoded at a reduced DCT scale when that is still at least this size
    (``Image.draft``), several times faster than a full decode. One size for every draw of the
    augmentation makes the decoded image a function of the file alone, which the image cache relies on.
    """
    width, height = original_size
    largest = input_size[1] / width * max(1.0, cfg.resize_range[1])
    return max(1, math.ceil(width * largest)), max(1, math.ceil(height * largest))


def decode_image(path, size: tuple[int, int]) -> Image.Image:
    """The RGB image of a camera file, JPEGs decoded at the smallest DCT scale of at least ``size`` (w, h)."""
    image = Image.open(path)
    if image.format == "JPEG":
        image.draft("RGB", size)
    return image.convert("RGB")


def apply_image_aug(
    image: Image.Image,
    original_size: tuple[int, int],
    resize: float,
    crop_flip_rotate: np.ndarray,
    input_size: tuple[int, int],
) -> tuple[Image.Image, np.ndarray]:
    """Resize (bilinear) then warp a decoded camera image into the network input.

    Args:
        image: the decoded image (:func:`decode_image`; possibly smaller than the file).
        original_size: (width, height) of the camera image the intrinsics refer to.
    Returns:
        The augmented image (input_size) and ``image_aug`` (3x3) mapping original pixels to it.
    """
    width, height = original_size
    target_w, target_h = max(1, round(width * resize)), max(1, round(height * resize))
    image = image.resize((target_w, target_h), Image.BILINEAR)
    scale = np.diag([target_w / width, target_h / height, 1.0])
    input_h, input_w = input_size
    inverse = np.linalg.inv(crop_flip_rotate)
    image = image.transform(
        (input_w, input_h), Image.AFFINE, data=tuple(inverse[:2].ravel()), resample=Image.BILINEAR
    )
    return image, crop_flip_rotate @ scale


def sample_bev_aug(rng: np.random.Generator | None, cfg: BEVAugConfig) -> np.ndarray:
    """Draw a 4x4 ``bev_aug`` (ego -> augmented ego); identity when ``rng`` is None."""
    if rng is None:
        return np.eye(4)
    angle = math.radians(rng.uniform(*cfg.rotate_range))
    scale = rng.uniform(*cfg.scale_range)
    flip_x = rng.uniform() < cfg.flip_x_prob
    flip_y = rng.uniform() < cfg.flip_y_prob
    cos, sin = math.cos(angle), math.sin(angle)
    rotation = np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
    flips = np.diag([-1.0 if flip_x else 1.0, -1.0 if flip_y else 1.0, 1.0])
    bev_aug = np.eye(4)
    bev_aug[:3, :3] = flips @ (scale * rotation)
    return bev_aug
