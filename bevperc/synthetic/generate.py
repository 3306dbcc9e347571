"""Generate a whole synthetic nuScenes world: scenes in worker processes, then the tables and maps.

Scenes are independent (their own random streams and tokens), so they run one per task in
``workers`` processes; the parent merges their records in scene order, so the output does
not depend on the number of workers. What the demo's world costs: docs/demo.md, "Run time".
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Iterator

from bevperc.synthetic.config import SyntheticConfig, scene_names_for
from bevperc.synthetic.rig import CAMERA_NAMES
from bevperc.synthetic.scene import SceneResult, generate_scene
from bevperc.synthetic.tables import SCENE_TABLES, StaticTables, map_records, static_tables, write_json, write_tables
from bevperc.synthetic.taxonomy import CLASS_COLOURS

GENERATOR_VERSION = "1.1.0"
GENERATOR_NAME = "bevperc.data.synthetic_nuscenes"
"""``dataset_info.json``'s ``generator``: the name worlds have always recorded (the old module path, still an
alias of this package), kept so that a world's files stay byte-identical across the move to ``bevperc.synthetic``."""


def generate(out_dir: str | os.PathLike, version: str = "v1.0-mini", seed: int = 0, progress: bool = True,
             **options: Any) -> Path:
    """Generate a synthetic nuScenes dataset at ``out_dir``; returns the dataset root.

    ``options`` are the fields of :class:`SyntheticConfig` (``samples_per_scene``,
    ``num_scenes``, ``split``, ``include_train``, ``train_scenes``, ``val_scenes``, ``objects_per_sample``, ``images``, ``lidar``,
    ``render_scale``, ``jpeg_quality``, ``annotation_radius``, ``bicycle_racks``,
    ``workers``, ``overwrite``). Raises ``FileExistsError`` when ``out_dir`` is a
    non-empty folder and ``overwrite`` is False.
    """
    known = {f.name for f in fields(SyntheticConfig)}
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; expected some of {sorted(known - {'version', 'seed'})}")
    cfg = SyntheticConfig(version=version, seed=seed, **options)
    cfg.validate()
    out = Path(out_dir)
    _prepare_out_dir(out, cfg.overwrite)
    start = time.time()
    names = scene_names_for(cfg)
    static = static_tables()
    if cfg.images:
        for cam in CAMERA_NAMES:
            (out / "samples" / cam).mkdir(parents=True, exist_ok=True)
    if cfg.lidar:
        (out / "samples" / "LIDAR_TOP").mkdir(parents=True, exist_ok=True)
    tables: dict[str, list[dict]] = {name: [] for name in SCENE_TABLES}
    n_samples = n_anns = 0
    for result in _scene_results(cfg, out, names, static, progress):
        for name, records in result.tables.items():
            tables[name].extend(records)
        n_samples += result.num_samples
        n_anns += result.num_annotations
    map_table = map_records(out, tables["log"])  # one per location used
    tables.update(static.tables)
    tables["map"] = map_table
    write_tables(out / cfg.version, tables)
    info = {
        "generator": GENERATOR_NAME,
        "generator_version": GENERATOR_VERSION,
        "version": cfg.version,
        "seed": cfg.seed,
        "options": {k: v for k, v in asdict(cfg).items() if k not in ("version", "seed", "workers", "overwrite")},
        "num_scenes": len(names),
        "num_samples": n_samples,
        "num_annotations": n_anns,
        "class_colours": {k: list(v) for k, v in CLASS_COLOURS.items()},
    }
    write_json(out / "dataset_info.json", info, indent=2)
    if progress:
        print(f"synthetic nuScenes {cfg.version}: {len(names)} scenes, {n_samples} samples, {n_anns} annotations "
              f"in {time.time() - start:.1f} s -> {out}")
    return out


def _scene_results(cfg: SyntheticConfig, out: Path, names: list[str], static: StaticTables,
                   progress: bool) -> Iterator[SceneResult]:
    """The scenes' results in scene order, computed in ``cfg.workers`` processes, with a progress bar."""
    jobs = [(cfg, str(out), name, idx, static) for idx, name in enumerate(names)]
    workers = max(1, min(cfg.workers, len(jobs)))
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=len(jobs), desc=f"synthetic {cfg.version} scenes", unit="scene",
               disable=not progress) if tqdm else None
    if workers == 1:
        results = (_scene_job(j) for j in jobs)
        pool = None
    else:
        ctx = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
        pool = ctx.Pool(workers)
        results = pool.imap(_scene_job, jobs)  # ordered: tables are independent of scheduling
    n_samples = n_anns = 0
    try:
        for result in results:
            n_samples += result.num_samples
            n_anns += result.num_annotations
            if bar:
                bar.update(1)
                bar.set_postfix(samples=n_samples, anns=n_anns)
            yield result
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if bar:
            bar.close()


def _scene_job(args: tuple) -> SceneResult:
    """One scene in a worker; BLAS limited to one thread (tiny matrices, and the processes already fill the cores)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return generate_scene(*args)
    with threadpool_limits(limits=1):
        return generate_scene(*args)


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Create ``out``; a non-empty one only with ``overwrite`` (the world's own files are removed first)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"output folder {out} exists and is not empty; pass overwrite=True (CLI: --overwrite) to replace it")
        for name in ("v1.0-mini", "v1.0-trainval", "samples", "sweeps", "maps", "dataset_info.json"):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
