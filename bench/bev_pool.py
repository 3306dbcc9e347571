"""Benchmark: fast BEV pooling vs LSS QuickCumsum, forward + backward time and peak memory.

Setting (BEVDet-R50 scale): 256x704 input, 6 cameras (the real nuScenes rig when
/work/shared/data/nuscenes-real-sample is present, else a synthetic ring), 59 depth bins,
stride-16 features 16x44, 64 and 80 context channels, 128x128 BEV grid of 0.8 m.

Methods, measured side by side in one run (interleaved rounds, median):
  * ``quickcumsum``  LSS reference: geometry -> ranks -> argsort -> outer-product volume ->
                     QuickCumsum (custom autograd) -> scatter, every call (as LSS does);
  * ``fast``         ``bev_pool`` with the plan (cells, kept points, order) recomputed every
                     call from the geometry (training with augmentation);
  * ``fast+cache``   ``bev_pool`` with a cached plan (fixed cameras, inference/eval).

Time: forward + backward (gradient for depth and context). Peak memory: one forward +
backward in a fresh subprocess per method after a 1-channel warm-up, CPU: the RSS high-water
mark (VmHWM, reset just before the call through /proc/self/clear_refs) minus the RSS before
the call (inputs and cached plan already allocated); CUDA: max_memory_allocated minus the
memory allocated before the call.

    .venv/bin/python bench/bev_pool.py                   # CPU (and CUDA if available)
    .venv/bin/python bench/bev_pool.py --threads 1 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bevperc.models.bev_pool import bev_pool, bev_pool_quickcumsum, make_pool_plan
from bevperc.models.config import BEVGridConfig, ViewTransformerConfig
from bevperc.models.lift import frustum_to_ego, make_frustum

SAMPLE_INFO = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "nuscenes-real-sample" / "sample_info.json"
METHODS = ("quickcumsum", "fast", "fast+cache")
VIEW = ViewTransformerConfig(input_size=(256, 704), depth_bins=(1.0, 60.0, 1.0))
GRID = BEVGridConfig()


def rig_geometry(device: torch.device) -> tuple[dict[str, torch.Tensor], str]:
    """Geometry tensors of one sample (B = 1) and where they came from."""
    height, width = VIEW.input_size
    scale = width / 1600.0
    image_aug = torch.tensor([[scale, 0.0, 0.0], [0.0, scale, -(900 * scale - height)], [0.0, 0.0, 1.0]])
    if SAMPLE_INFO.is_file():
        images = json.loads(SAMPLE_INFO.read_text())["data_list"][0]["images"]  # the 6 cameras, file order
        intrinsics = torch.tensor([camera["cam2img"] for camera in images.values()], dtype=torch.float32)
        ego_from_camera = torch.tensor([camera["cam2ego"] for camera in images.values()], dtype=torch.float32)
        source = "real nuScenes rig"
    else:
        intrinsics = torch.tensor([[1260.0, 0.0, 800.0], [0.0, 1260.0, 450.0], [0.0, 0.0, 1.0]]).expand(6, 3, 3)
        cams = []
        for k in range(6):
            yaw = k * math.pi / 3
            pose = torch.eye(4)
            pose[:3, 0] = torch.tensor([math.sin(yaw), -math.cos(yaw), 0.0])
            pose[:3, 1] = torch.tensor([0.0, 0.0, -1.0])
            pose[:3, 2] = torch.tensor([math.cos(yaw), math.sin(yaw), 0.0])
            pose[:3, 3] = torch.tensor([math.cos(yaw), math.sin(yaw), 1.6])
            cams.append(pose)
        ego_from_camera = torch.stack(cams)
        source = "synthetic 6-camera ring"
    geometry = {
        "intrinsics": intrinsics[None],
        "ego_from_camera": ego_from_camera[None],
        "image_aug": image_aug.expand(1, 6, 3, 3),
        "bev_aug": torch.eye(4)[None],
    }
    return {k: v.to(device) for k, v in geometry.items()}, source


def make_inputs(channels: int, device: torch.device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    height, width = VIEW.feature_size
    depth = torch.randn(1, 6, VIEW.num_depth_bins, height, width, generator=generator).softmax(2).to(device)
    context = torch.randn(1, 6, height, width, channels, generator=generator).to(device)
    grad_out = torch.randn(1, channels, GRID.num_y, GRID.num_x, generator=generator).to(device)
    return depth.requires_grad_(), context.requires_grad_(), grad_out


def make_step(method: str, geometry: dict[str, torch.Tensor], frustum: torch.Tensor):
    """A function (depth, context, grad_out) -> BEV output running forward + backward."""
    cached_plan = make_pool_plan(frustum_to_ego(frustum, **geometry).float(), GRID) if method == "fast+cache" else None

    def step(depth, context, grad_out):
        depth.grad = context.grad = None
        if method == "quickcumsum":
            points = frustum_to_ego(frustum, **geometry).float()
            out = bev_pool_quickcumsum(depth, context, points, GRID)
        elif method == "fast":
            plan = make_pool_plan(frustum_to_ego(frustum, **geometry).float(), GRID)
            out = bev_pool(depth, context, plan)
        else:
            out = bev_pool(depth, context, cached_plan)
        out.backward(grad_out)
        return out

    return step


def time_methods(channels: int, device: torch.device, repeats: int) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Median forward+backward wall and CPU milliseconds per method (interleaved rounds), max |diff| vs reference.

    On a shared CPU, wall time includes waiting for other processes; the process CPU time
    (``time.process_time``, summed over threads) is the steadier measure with ``--threads 1``.
    """
    geometry, _ = rig_geometry(device)
    frustum = make_frustum(VIEW).to(device)
    depth, context, grad_out = make_inputs(channels, device)
    steps = {m: make_step(m, geometry, frustum) for m in METHODS}
    outputs = {m: steps[m](depth, context, grad_out).detach() for m in METHODS}  # warm-up + check
    diffs = {m: float((outputs[m] - outputs["quickcumsum"]).abs().max()) for m in METHODS}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    cpu_times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(repeats):
        for method in METHODS:
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                steps[method](depth, context, grad_out)
                end.record()
                torch.cuda.synchronize()
                times[method].append(start.elapsed_time(end))
                cpu_times[method].append(float("nan"))
            else:
                start_time, start_cpu = time.perf_counter(), time.process_time()
                steps[method](depth, context, grad_out)
                cpu_times[method].append((time.process_time() - start_cpu) * 1000)
                times[method].append((time.perf_counter() - start_time) * 1000)
    median = lambda values: {m: statistics.median(t) for m, t in values.items()}  # noqa: E731
    return median(times), median(cpu_times), diffs


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_child(method: str, channels: int, device_name: str) -> None:
    """Subprocess body: print the peak extra memory (bytes) of one forward + backward."""
    device = torch.device(device_name)
    geometry, _ = rig_geometry(device)
    frustum = make_frustum(VIEW).to(device)
    depth, context, grad_out = make_inputs(channels, device)
    step = make_step(method, geometry, frustum)
    # warm up with 1 channel (tiny buffers) so one-time library/thread-pool allocations
    # do not count as the method's memory
    small = make_inputs(1, device)
    step(*small)
    del small
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(depth, context, grad_out)
        torch.cuda.synchronize()
        print(torch.cuda.max_memory_allocated() - before)
    else:
        # the peak of this one call: reset the high-water mark, else ru_maxrss would also
        # hold whatever peak came before (imports, set-up)
        if reset_peak_rss():
            before = _status_bytes("VmRSS")
            step(depth, context, grad_out)
            print(_status_bytes("VmHWM") - before)
        else:  # no /proc/self/clear_refs: fall back to ru_maxrss (an upper bound)
            before = _status_bytes("VmRSS")
            step(depth, context, grad_out)
            print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)


def peak_memory(method: str, channels: int, device: str, threads: int | None) -> float:
    """Peak extra MiB of one forward + backward, measured in a fresh subprocess."""
    command = [sys.executable, __file__, "--child", method, "--channels", str(channels), "--device", device]
    if threads:
        command += ["--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 80])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: steadier on a shared CPU)")
    parser.add_argument("--device", default=None, help="only this device (cpu / cuda)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        peak_memory_child(args.child, args.channels[0], args.device)
        return

    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    _, source = rig_geometry(torch.device("cpu"))
    plan = make_pool_plan(frustum_to_ego(make_frustum(VIEW), **rig_geometry(torch.device("cpu"))[0]), GRID)
    total_points = 6 * VIEW.num_depth_bins * VIEW.feature_size[0] * VIEW.feature_size[1]
    print(f"BEV pooling, {source}: 256x704 input, 6 cameras, {VIEW.num_depth_bins} depth bins, features "
          f"{VIEW.feature_size[0]}x{VIEW.feature_size[1]}, grid {GRID.num_y}x{GRID.num_x}; "
          f"{plan.point_ids.numel()} of {total_points} frustum points in the grid; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} interleaved rounds.\n")
    print("| device | C | method | fwd+bwd wall ms | fwd+bwd CPU ms | speed-up vs QuickCumsum (CPU time; CUDA: wall) "
          "| peak extra MiB | memory vs QuickCumsum | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for device in devices:
        for channels in args.channels:
            times, cpu_times, diffs = time_methods(channels, torch.device(device), args.repeats)
            memory = {m: peak_memory(m, channels, device, args.threads) for m in METHODS}
            ratio_source = times if device == "cuda" else cpu_times
            for method in METHODS:
                print(
                    f"| {device} | {channels} | {method} | {times[method]:.1f} | {cpu_times[method]:.1f} | "
                    f"{ratio_source['quickcumsum'] / ratio_source[method]:.2f}x | {memory[method]:.0f} | "
                    f"{memory[method] / max(memory['quickcumsum'], 1e-9):.2f} | {diffs[method]:.1e} |"
                )
            sys.stdout.flush()


if __name__ == "__main__":
    main()
