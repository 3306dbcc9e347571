"""A disk cache of decoded camera images, so that every epoch after the first skips JPEG decoding.

It stores what :func:`bevperc.data.augment.decode_image` returns (the RGB pixels at the JPEG
draft scale the pipeline decodes at, e.g. 400x225 for a 1600x900 image and a 352-px-wide input)
as one ``.npy`` file per camera image, so a cached image is bit-identical to a decoded one and
the augmentation that follows is unchanged. Files are written atomically the first time an image
is read, by whichever DataLoader worker reads it.

The cache folder of a split is named by a key over the info file's contents and the decode size:
new infos (another dataset, a regenerated world) or another input size or resize range give
another folder, so a stale image is never read. Older folders are left in place (a run with
another input size may still be using them); delete the cache root to reclaim the space.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

from bevperc.data.augment import decode_image

CACHE_FORMAT = 1


class ImageCache:
    """``load(path, size) -> PIL image`` through a folder of ``.npy`` files.

    Args:
        root: where the cache folders live (one per split and key).
        split: the split name (the first part of the folder name).
        info_path: the split's info file; its bytes are part of the key.
        size: the decode size (w, h), see :func:`bevperc.data.augment.draft_size`.
    """

    def __init__(self, root: str | Path, split: str, info_path: str | Path, size: tuple[int, int]):
        digest = hashlib.sha256(Path(info_path).read_bytes())
        digest.update(f"|{size[0]}x{size[1]}|format{CACHE_FORMAT}".encode())
        self.size = size
        self.folder = Path(root) / f"{split}-{digest.hexdigest()[:16]}"
        self.folder.mkdir(parents=True, exist_ok=True)

    def entry(self, key: str) -> Path:
        return self.folder / f"{key}.npy"

    def load(self, image_path: str | Path, key: str) -> Image.Image:
        """The decoded image of ``image_path``, from the cache entry ``key`` (written on a miss)."""
        entry = self.entry(key)
        try:
            return Image.fromarray(np.load(entry, allow_pickle=False))
        except (FileNotFoundError, ValueError, EOFError, OSError):
            pass  # missing, or cut short by a killed writer: decode again
        image = decode_image(image_path, self.size)
        temporary = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        with open(temporary, "wb") as handle:
            np.save(handle, np.asarray(image), allow_pickle=False)
        os.replace(temporary, entry)
        return image
