"""Atomic file writes: a crash mid-write never leaves a truncated result behind.

A write that fails (disk full, file-size limit) removes its temporary file and raises an
``OSError`` naming the file; on a full disk: ``no space left on <folder>``.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """``write(tmp)`` fills a temporary file next to ``path``, which is then renamed over ``path``.

    If ``write`` raises (e.g. a check of the written file fails), nothing appears at ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp creates 0600 files; give results the usual permissions (0666 minus the umask)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on {path.parent} while writing {path.name}") from err
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as handle:
            handle.write(text)

    return atomic_write(path, write)


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent))


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temp file in the same folder, then rename over ``path``."""
    import torch

    def write(tmp: str) -> None:
        # Through a Python file object, so that a failed write raises an OSError with its errno (torch's
        # own writer reports a full disk as "unexpected pos", also when it closes the archive after it).
        try:
            with open(tmp, "wb") as handle:
                torch.save(obj, handle)
        except RuntimeError as err:
            cause = err.__context__
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__context__
            if cause is None:
                raise
            raise cause from None

    return atomic_write(path, write)
