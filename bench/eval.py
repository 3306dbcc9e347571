"""Benchmark: the devkit's DetectionEval vs bevperc's fast exact evaluator, side by side in one run.

    .venv/bin/python bench/eval.py --json bench/results/eval.json   # val-sized: 6019 samples, 40 GT + 300 predictions each
    .venv/bin/python bench/eval.py --samples 1200 --evaluators fast,fast-cached-gt   # smaller, without the devkit

Setup writes a minimal valid ``v1.0-trainval`` table set (only the tables the devkit's NuScenes class
loads; the ``val`` scenes; ~40 annotations per sample with tracks, velocities, zero-point boxes,
bicycle racks, classes at their range limits) and a submission of noisy GT copies + false
positives (scores quantised so that ties occur, a few NaN velocities). Each evaluator then runs in its
own subprocess (so that each peak RSS is its own, read from ``getrusage`` in that process); the
metrics of the two are compared key by key. Prints markdown tables: the evaluators, and each stage of
the fast evaluator (wall and CPU seconds, from ``EvalResult.timings``); ``--json`` writes all of it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bevperc.data.classes import ATTRIBUTE_NAMES as ATTRIBUTES
from bevperc.data.classes import CATEGORY_TO_DETECTION_NAME as DETECTION_OF
from bevperc.data.classes import CLASS_ATTRIBUTES as CLASS_ATTRS
from bevperc.geometry import yaw_to_quaternion as _yaw_quaternion

REPO = Path(__file__).resolve().parents[1]

CATEGORIES = [
    "human.pedestrian.adult", "human.pedestrian.child", "human.pedestrian.construction_worker",
    "human.pedestrian.police_officer", "human.pedestrian.stroller", "animal", "movable_object.barrier",
    "movable_object.trafficcone", "movable_object.debris", "static_object.bicycle_rack", "vehicle.bicycle",
    "vehicle.bus.bendy", "vehicle.bus.rigid", "vehicle.car", "vehicle.construction", "vehicle.motorcycle",
    "vehicle.trailer", "vehicle.truck", "vehicle.emergency.police",
]
CATEGORY_WEIGHTS = np.array([12, 1, 1, 0.5, 0.3, 0.3, 6, 5, 0.5, 0.6, 2, 0.3, 1, 25, 1, 1.5, 2, 5, 0.2])
SIZES = {"human": (0.7, 0.7, 1.8), "animal": (0.5, 1.0, 0.8), "movable_object.barrier": (2.5, 0.5, 1.0),
         "movable_object.trafficcone": (0.4, 0.4, 1.0), "movable_object.debris": (0.5, 0.5, 0.3),
         "static_object.bicycle_rack": (8.0, 2.0, 1.2), "vehicle.bicycle": (0.6, 1.7, 1.3),
         "vehicle.bus": (2.9, 11.0, 3.5), "vehicle.car": (1.9, 4.6, 1.7), "vehicle.construction": (2.8, 6.5, 3.2),
         "vehicle.motorcycle": (0.8, 2.1, 1.5), "vehicle.trailer": (2.9, 12.0, 3.9), "vehicle.truck": (2.5, 7.0, 2.9),
         "vehicle.emergency": (2.0, 5.0, 2.0)}


def _size_of(category: str) -> tuple[float, float, float]:
    for prefix, size in SIZES.items():
        if category.startswith(prefix):
            return size
    raise KeyError(category)


class _Tokens:
    """Deterministic 32-hex-character tokens."""

    def __init__(self, seed: int):
        self.seed = seed
        self.count = 0

    def __call__(self) -> str:
        self.count += 1
        return f"{self.seed:08x}{self.count:024x}"


def write_synthetic_nuscenes(root: str | Path, version: str = "v1.0-trainval", split: str = "val",
                             samples_per_scene: int = 40, gt_per_sample: int = 40, max_scenes: int | None = None,
                             seed: int = 0) -> list[str]:
    """Write a minimal valid nuScenes table set (what ``NuScenes`` loads) for the scenes of ``split``.

    Returns the sample tokens of the split in table order. Annotations follow tracks (prev/next) with
    0.5 s steps and occasional 2 s gaps (so some velocities are NaN), include non-detection categories,
    boxes with zero points and bicycles parked inside bicycle racks; objects spread to ~70 m so the
    class range filter matters. The tables are its own (sequential tokens, edge cases the synthetic world
    does not make); the files are written by the synthetic world's writer, ``bevperc.synthetic.write_tables``.
    """
    from nuscenes.utils.splits import create_splits_scenes
    from PIL import Image

    from bevperc.synthetic import write_tables

    rng = np.random.default_rng(seed)
    token = _Tokens(seed)
    root = Path(root)
    table_dir = root / version
    table_dir.mkdir(parents=True, exist_ok=True)
    (root / "maps").mkdir(exist_ok=True)
    Image.new("L", (8, 8)).save(root / "maps" / "map.png")
    scene_names = sorted(create_splits_scenes()[split])[:max_scenes]

    categories = [{"token": token(), "name": n, "description": n} for n in CATEGORIES]
    attributes = [{"token": token(), "name": n, "description": n} for n in ATTRIBUTES]
    attr_token = {a["name"]: a["token"] for a in attributes}
    visibility = [{"token": str(i), "level": lvl, "description": lvl}
                  for i, lvl in enumerate(["v0-40", "v40-60", "v60-80", "v80-100"], start=1)]
    sensors = [{"token": token(), "channel": "LIDAR_TOP", "modality": "lidar"},
               {"token": token(), "channel": "CAM_FRONT", "modality": "camera"}]
    logs, scenes, samples, sample_data, ego_poses, calibrated, instances, annotations = [], [], [], [], [], [], [], []
    map_record = {"token": token(), "filename": "maps/map.png", "category": "semantic_prior", "log_tokens": []}
    sample_tokens: list[str] = []
    cat_p = CATEGORY_WEIGHTS / CATEGORY_WEIGHTS.sum()
    for scene_i, name in enumerate(scene_names):
        log = {"token": token(), "logfile": name, "vehicle": "v", "date_captured": "2018-01-01",
               "location": "singapore-onenorth"}
        logs.append(log)
        map_record["log_tokens"].append(log["token"])
        cs = {s["channel"]: {"token": token(), "sensor_token": s["token"], "translation": [1.0, 0.0, 1.8],
                             "rotation": [1.0, 0.0, 0.0, 0.0], "camera_intrinsic": []} for s in sensors}
        calibrated.extend(cs.values())
        scene = {"token": token(), "log_token": log["token"], "nbr_samples": samples_per_scene, "name": name,
                 "description": "synthetic"}
        scenes.append(scene)
        t0 = 1_530_000_000_000_000 + scene_i * 10**9
        steps = np.where(rng.random(samples_per_scene) < 0.04, 2_000_000, 500_000)
        steps[0] = 0
        times = t0 + np.cumsum(steps)
        ego_xy = np.cumsum(rng.normal(0, 2.0, size=(samples_per_scene, 2)), axis=0) + rng.uniform(-500, 500, 2)
        scene_samples = [{"token": token(), "timestamp": int(t), "prev": "", "next": "", "scene_token": scene["token"]}
                         for t in times]
        for a, b in zip(scene_samples[:-1], scene_samples[1:]):
            a["next"], b["prev"] = b["token"], a["token"]
        scene["first_sample_token"], scene["last_sample_token"] = scene_samples[0]["token"], scene_samples[-1]["token"]
        samples.extend(scene_samples)
        sample_tokens.extend(s["token"] for s in scene_samples)
        for k, s in enumerate(scene_samples):
            pose = {"token": token(), "timestamp": s["timestamp"], "rotation": [1.0, 0.0, 0.0, 0.0],
                    "translation": [float(ego_xy[k, 0]), float(ego_xy[k, 1]), 0.0]}
            ego_poses.append(pose)
            for channel, key_frame in (("CAM_FRONT", True), ("LIDAR_TOP", False), ("LIDAR_TOP", True)):
                # a non-key-frame sweep with another pose, to check that only the key frame counts
                sweep_pose = pose
                if not key_frame:
                    sweep_pose = dict(pose, token=token(), translation=[pose["translation"][0] + 30.0,
                                                                         pose["translation"][1], 0.0])
                    ego_poses.append(sweep_pose)
                sample_data.append({"token": token(), "sample_token": s["token"], "ego_pose_token": sweep_pose["token"],
                                    "calibrated_sensor_token": cs[channel]["token"], "timestamp": s["timestamp"],
                                    "fileformat": "pcd" if channel == "LIDAR_TOP" else "jpg",
                                    "is_key_frame": key_frame, "height": 0, "width": 0,
                                    "filename": f"samples/{channel}/{s['token']}", "prev": "", "next": ""})
        # Tracks: each lives over a random span of consecutive samples of the scene.
        n_tracks = int(gt_per_sample * samples_per_scene / 8)
        for _ in range(n_tracks):
            category = CATEGORIES[rng.choice(len(CATEGORIES), p=cat_p)]
            length = int(rng.integers(1, 16))
            first = int(rng.integers(0, samples_per_scene))
            span = range(first, min(samples_per_scene, first + length))
            inst = {"token": token(), "category_token": categories[CATEGORIES.index(category)]["token"],
                    "nbr_annotations": len(span)}
            instances.append(inst)
            detection = DETECTION_OF.get(category)
            w, l, h = (np.array(_size_of(category)) * rng.uniform(0.8, 1.2, 3)).tolist()
            radius = rng.uniform(0, 75)
            angle = rng.uniform(-np.pi, np.pi)
            base = ego_xy[first] + radius * np.array([np.cos(angle), np.sin(angle)])
            speed = rng.normal(0, 3, 2) if rng.random() < 0.5 else np.zeros(2)
            yaw = rng.uniform(-np.pi, np.pi)
            prev = None
            for k in span:
                dt = (times[k] - times[first]) * 1e-6
                xy = base + speed * dt
                attrs = []
                if detection and CLASS_ATTRS[detection] and rng.random() > 0.01:
                    attrs = [attr_token[CLASS_ATTRS[detection][int(rng.integers(len(CLASS_ATTRS[detection])))]]]
                ann = {"token": token(), "sample_token": scene_samples[k]["token"], "instance_token": inst["token"],
                       "visibility_token": "4", "attribute_tokens": attrs,
                       "translation": [float(xy[0]), float(xy[1]), float(h / 2)], "size": [w, l, h],
                       "rotation": _yaw_quaternion(np.array(yaw)).tolist(), "prev": "", "next": "",
                       "num_lidar_pts": int(rng.integers(0, 40)) if rng.random() < 0.93 else 0,
                       "num_radar_pts": int(rng.integers(0, 3)) if rng.random() < 0.5 else 0}
                if prev is not None:
                    prev["next"], ann["prev"] = ann["token"], prev["token"]
                annotations.append(ann)
                prev = ann
                if category == "static_object.bicycle_rack" and rng.random() < 0.7:
                    # a parked bicycle inside the rack (removed by the devkit's bike-rack filter)
                    bike = {"token": token(), "category_token": categories[CATEGORIES.index("vehicle.bicycle")]["token"],
                            "nbr_annotations": 1}
                    instances.append(bike)
                    annotations.append(dict(ann, token=token(), instance_token=bike["token"], prev="", next="",
                                            size=[0.6, 1.7, 1.1], attribute_tokens=[attr_token["cycle.without_rider"]],
                                            translation=[float(xy[0]) + 0.5, float(xy[1]), 0.6]))
    # Tables are written in an order unrelated to the scenes for annotations (as in the real data).
    perm = rng.permutation(len(annotations))
    annotations = [annotations[i] for i in perm]
    for inst in instances:
        inst["first_annotation_token"] = inst["last_annotation_token"] = ""
    tables = {"category": categories, "attribute": attributes, "visibility": visibility, "sensor": sensors,
              "calibrated_sensor": calibrated, "log": logs, "scene": scenes, "sample": samples,
              "sample_data": sample_data, "ego_pose": ego_poses, "instance": instances,
              "sample_annotation": annotations, "map": [map_record]}
    write_tables(table_dir, tables)
    return sample_tokens


def write_synthetic_submission(root: str | Path, version: str, sample_tokens: list[str], path: str | Path,
                               preds_per_sample: int = 300, seed: int = 1, empty_fraction: float = 0.02) -> None:
    """A submission with noisy copies of the GT (detection classes) and false positives around the ego.

    Scores are rounded to 1/200 (ties), ~0.5% of velocities are NaN, ``empty_fraction`` of the samples
    have no boxes. Streams the file sample by sample.
    """
    rng = np.random.default_rng(seed)
    table_dir = Path(root) / version
    with open(table_dir / "sample_annotation.json") as handle:
        annotations = json.load(handle)
    inst_cat = {i["token"]: i["category_token"] for i in json.load(open(table_dir / "instance.json"))}
    cat_name = {c["token"]: c["name"] for c in json.load(open(table_dir / "category.json"))}
    by_sample: dict[str, list] = {}
    for ann in annotations:
        name = DETECTION_OF.get(cat_name[inst_cat[ann["instance_token"]]])
        if name is not None:
            by_sample.setdefault(ann["sample_token"], []).append((name, ann))
    del annotations
    sd = json.load(open(table_dir / "sample_data.json"))
    poses = {p["token"]: p["translation"] for p in json.load(open(table_dir / "ego_pose.json"))}
    lidar_cs = {c["token"] for c in json.load(open(table_dir / "calibrated_sensor.json"))} & {
        r["calibrated_sensor_token"] for r in sd if r["filename"].startswith("samples/LIDAR_TOP")}
    ego_of = {r["sample_token"]: poses[r["ego_pose_token"]] for r in sd
              if r["is_key_frame"] and r["calibrated_sensor_token"] in lidar_cs}
    del sd, poses
    names = list(CLASS_ATTRS)
    with open(path, "w") as out:
        out.write('{"meta": {"use_camera": true, "use_lidar": false, "use_radar": false, "use_map": false, '
                  '"use_external": false}, "results": {')
        for si, token in enumerate(sample_tokens):
            boxes = []
            if rng.random() >= empty_fraction:
                for name, ann in by_sample.get(token, []):
                    if rng.random() < 0.75 and len(boxes) < preds_per_sample:
                        t = np.array(ann["translation"]) + np.append(rng.normal(0, 0.6, 2), 0)
                        yaw = 2 * math.atan2(ann["rotation"][3], ann["rotation"][0]) + rng.normal(0, 0.3)
                        boxes.append(_pred_box(token, name, t, np.array(ann["size"]) * rng.uniform(0.8, 1.2, 3), yaw,
                                               rng, score=rng.uniform(0.2, 1.0)))
                ego = np.array(ego_of[token])
                while len(boxes) < preds_per_sample:
                    name = names[int(rng.integers(len(names)))]
                    r, a = rng.uniform(0, 60), rng.uniform(-np.pi, np.pi)
                    t = ego + np.array([r * math.cos(a), r * math.sin(a), 1.0])
                    boxes.append(_pred_box(token, name, t, rng.uniform(0.5, 5, 3), rng.uniform(-np.pi, np.pi), rng,
                                           score=rng.uniform(0.0, 0.6)))
            out.write(("," if si else "") + json.dumps(token) + ":" + json.dumps(boxes))
        out.write("}}")


def _pred_box(token: str, name: str, t: np.ndarray, size: np.ndarray, yaw: float, rng: np.random.Generator,
              score: float) -> dict:
    attrs = CLASS_ATTRS[name]
    velocity = rng.normal(0, 2, 2).tolist() if rng.random() > 0.005 else [float("nan"), float("nan")]
    return {"sample_token": token, "translation": t.tolist(), "size": size.tolist(),
            "rotation": _yaw_quaternion(np.array(yaw)).tolist(), "velocity": velocity, "detection_name": name,
            "detection_score": round(score * 200) / 200,
            "attribute_name": attrs[int(rng.integers(len(attrs)))] if attrs else ""}


# --------------------------------------------------------------------------- measurement
_CHILD = r"""
import json, resource, sys, time
evaluator, results, dataroot, version, split, out, workers = sys.argv[1:8]
started = time.perf_counter()
stages = {}
if evaluator == "devkit":
    from bevperc.evaluation.devkit_eval import run_devkit_eval
    summary = run_devkit_eval(results, dataroot, version, split, out, validate=False)
    worker_peak = 0.0
else:
    from bevperc.evaluation.fast_eval import FastDetectionEval, to_jsonable, write_metrics
    from bevperc.evaluation.timing import StageTimer
    from bevperc.evaluation.workers import shutdown_workers, worker_peak_mib
    stages["startup"] = {"wall_s": time.perf_counter() - started, "cpu_s": time.process_time(), "task_cpu_s": 0.0}
    cache = out + "_gt_cache" if evaluator == "fast-cached-gt" else None
    fast = FastDetectionEval(dataroot, version, split, cache_dir=cache, workers=int(workers) or None)
    result = fast.evaluate_file(results)
    timer = StageTimer()
    with timer.stage("write"):
        write_metrics(result, out)
    stages |= fast.load_timings | result.timings | timer.as_dict()
    summary = to_jsonable(result.summary)
    worker_peak = worker_peak_mib()
    shutdown_workers()  # so that RUSAGE_CHILDREN includes their CPU time
seconds = time.perf_counter() - started
usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
cpu_seconds = sum(u.ru_utime + u.ru_stime for u in usage)  # all processes; less sensitive than wall time to load
peak_mib = usage[0].ru_maxrss / 1024 + worker_peak  # main + each worker's own peak: an upper bound
print("BENCH_RESULT " + json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_mib": peak_mib,
                                    "worker_peak_mib": worker_peak, "stages": stages, "summary": summary}))
"""

# Stage names of the fast evaluator (bevperc.evaluation.timing.StageTimer keys) -> what the bench prints.
STAGE_LABELS = {
    "startup": "startup: imports",
    "gt_cache": "GT: load the .npz cache",
    "gt_samples": "GT: sample + scene tables",
    "gt_ego": "GT: ego poses (sample_data, ego_pose)",
    "gt_annotation_ranges": "GT: sample_annotation decode + columns, per range",
    "gt_annotations": "GT: sample_annotation -> boxes, velocities (total)",
    "gt_filter": "GT: filter + split by class",
    "sub_plan": "submission: layout + byte ranges",
    "sub_decode": "submission: read + decode (msgspec), per range",
    "sub_validate": "submission: columns + validation, per range",
    "pred_filter": "predictions: filter + split by class, per range",
    "sub_chunks": "submission: all ranges (workers)",
    "submission": "submission: total",
    "pred_gather": "predictions: gather each class",
    "sort": "sort by score",
    "match": "match",
    "accumulate": "accumulate (curves, TP errors)",
    "summarize": "metrics summary",
    "write": "write metrics JSON",
}


def run_evaluator(evaluator: str, results: Path, dataroot: Path, version: str, split: str, out: Path,
                  workers: int = 0) -> dict:
    """Run one evaluator in a fresh subprocess (honest peak RSS); returns seconds, cpu_seconds, peak_mib,
    stages and summary. ``workers``: the fast evaluator's worker processes (0: its default).

    ``fast-cached-gt``: the GT .npz cache is built first (not timed), as after the first epoch of training.
    """
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if evaluator == "fast-cached-gt":
        subprocess.run([sys.executable, "-c", "import sys; from bevperc.evaluation.fast_eval import load_ground_truth; "
                        "load_ground_truth(*sys.argv[1:4], cache_dir=sys.argv[4])", str(dataroot), version, split,
                        str(out) + "_gt_cache"], check=True, env=env)
    proc = subprocess.run([sys.executable, "-c", _CHILD, evaluator, str(results), str(dataroot), version, split,
                           str(out), str(workers)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{evaluator} evaluator failed:\n{proc.stderr[-4000:]}")
    line = [l for l in proc.stdout.splitlines() if l.startswith("BENCH_RESULT ")][-1]
    return json.loads(line[len("BENCH_RESULT "):])


def compare_summaries(a: dict, b: dict, path: str = "") -> float:
    """Largest absolute difference between two metric summaries (NaN == NaN); skips eval_time/cfg/meta."""
    worst = 0.0
    for key in a:
        if key in ("eval_time", "cfg", "meta"):
            continue
        x, y = a[key], b[str(key)] if str(key) in b else b[key]
        if isinstance(x, dict):
            worst = max(worst, compare_summaries(x, y, f"{path}{key}."))
        elif not (math.isnan(x) and math.isnan(y)):
            if math.isnan(x) or math.isnan(y):
                return math.inf
            worst = max(worst, abs(x - y))
    return worst


def stage_table(runs: dict[str, dict]) -> list[str]:
    """Markdown rows: each stage of the fast evaluators, wall time in the main process and CPU time
    (main process + tasks; a per-range stage runs in the workers and has CPU time only)."""
    fast = {evaluator: run for evaluator, run in runs.items() if run.get("stages")}
    names = list(dict.fromkeys(name for run in fast.values() for name in run["stages"]))
    rows = ["| stage | " + " | ".join(f"{e}: wall (s) | {e}: CPU (s)" for e in fast) + " |",
            "|---|" + "---|---|" * len(fast)]
    for name in names:
        cells = []
        for run in fast.values():
            stage = run["stages"].get(name)
            if stage is None:
                cells += ["", ""]
                continue
            wall = f"{stage['wall_s']:.2f}" if stage["wall_s"] > 0 else "-"
            cells += [wall, f"{stage['cpu_s'] + stage['task_cpu_s']:.2f}"]
        rows.append(f"| {STAGE_LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=6019, help="samples in the split (val has 6019)")
    parser.add_argument("--gt-per-sample", type=int, default=40)
    parser.add_argument("--preds-per-sample", type=int, default=300)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the generated data here (reused by later runs with the same workdir)")
    parser.add_argument("--evaluators", "--engines", dest="evaluators", default="devkit,fast,fast-cached-gt",
                        help="comma-separated: devkit, fast (reads the GT tables), fast-cached-gt "
                             "(--engines: the old spelling)")
    parser.add_argument("--workers", type=int, default=0, help="worker processes of the fast evaluator (0: default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the runs (stages included) here")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bevperc_bench_eval_"))
    dataroot = workdir / "nuscenes"
    version, split = "v1.0-trainval", "val"
    results = workdir / "results.json"
    samples_per_scene = 40
    n_scenes = math.ceil(args.samples / samples_per_scene)
    if not results.is_file():
        started = time.perf_counter()
        tokens = write_synthetic_nuscenes(dataroot, version, split, samples_per_scene=samples_per_scene,
                                          gt_per_sample=args.gt_per_sample, max_scenes=n_scenes)
        write_synthetic_submission(dataroot, version, tokens, results, args.preds_per_sample)
        print(f"setup: {len(tokens)} samples, {results.stat().st_size / 2**20:.0f} MiB submission "
              f"in {time.perf_counter() - started:.0f} s ({workdir})", file=sys.stderr)
    runs = {}
    for evaluator in args.evaluators.split(","):
        runs[evaluator] = run_evaluator(evaluator, results, dataroot, version, split, workdir / f"out_{evaluator}",
                                        args.workers)
        print(f"{evaluator}: {runs[evaluator]['seconds']:.1f} s, peak {runs[evaluator]['peak_mib']:.0f} MiB",
              file=sys.stderr)
    n_gt = open(dataroot / version / "sample_annotation.json").read().count('"instance_token"')
    n_samples = open(dataroot / version / "sample.json").read().count('"scene_token"')
    setting = (f"Synthetic {version}/{split}: {n_samples} samples, {n_gt} annotations, {args.preds_per_sample} "
               f"predictions per sample ({results.stat().st_size / 2**20:.0f} MiB); {os.cpu_count()} CPUs, each "
               "evaluator in its own process.")
    print(f"\n{setting}\n")
    ref = runs.get("devkit")
    print("| evaluator | wall (s) | CPU (s) | peak RSS (MiB) | speed-up wall / CPU | memory vs devkit | mAP | NDS | "
          "max metric diff vs devkit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for evaluator, run in runs.items():
        ratio = (f"{ref['seconds'] / run['seconds']:.1f}x / {ref['cpu_seconds'] / run['cpu_seconds']:.1f}x"
                 if ref else "-")
        memory = f"{run['peak_mib'] / ref['peak_mib']:.2f}" if ref else "-"
        diff = compare_summaries(ref["summary"], run["summary"]) if ref else None
        run["max_metric_diff_vs_devkit"] = diff
        print(f"| {evaluator} | {run['seconds']:.1f} | {run['cpu_seconds']:.1f} | {run['peak_mib']:.0f} | {ratio} | "
              f"{memory} | {run['summary']['mean_ap']:.6f} | {run['summary']['nd_score']:.6f} | "
              f"{'-' if diff is None else f'{diff:.1e}'} |")
    print("\nStages of the fast evaluator (wall: main process; CPU: main process + worker tasks):\n")
    print("\n".join(stage_table(runs)))
    load = os.getloadavg()
    print(f"\nload average during the run (1/5/15 min): {load}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"setting": setting, "command": " ".join(sys.argv), "load_average": load,
                                         "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
