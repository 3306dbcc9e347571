"""Export a gesture detector to ONNX and check it numerically against onnxruntime.

The exported graph maps a normalised image [B,3,S,S] to (heatmap probabilities [B,C,h,w],
wh [B,2,h,w], offset [B,2,h,w]); decoding (peak picking) stays on the host
(``bevperc.models.centernet.decode_centernet(..., heatmap_is_logits=False)``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bevperc.gesture.train import load_centernet
from bevperc.models.centernet import ExportableCenterNet
from bevperc.utils.io import atomic_write_json

OUTPUT_NAMES = ["heatmap", "wh", "offset"]


def export_onnx(checkpoint: str | Path, onnx_path: str | Path, opset: int = 17, batch_size: int = 2,
                atol: float = 1e-4, seed: int = 0) -> dict[str, Any]:
    """Export, run onnxruntime and torch on the same random input, compare; raise if they differ.

    Returns {"onnx": path, "max_abs_diff": {output: value}, "atol": atol}; also written next to
    the model as ``<name>.check.json``.
    """
    import onnx
    import onnxruntime as ort

    model, payload = load_centernet(checkpoint)
    wrapper = ExportableCenterNet(model).eval()
    size = payload["input_size"]
    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(1, 3, size, size)
    tmp = onnx_path.with_name(f".{onnx_path.name}.tmp")
    # The TorchScript-based exporter (dynamo=False) needs no onnxscript and handles this conv net.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(wrapper, (dummy,), str(tmp), input_names=["image"], output_names=OUTPUT_NAMES,
                          dynamic_axes={"image": {0: "batch"}, **{n: {0: "batch"} for n in OUTPUT_NAMES}},
                          opset_version=opset, dynamo=False)
    onnx.checker.check_model(onnx.load(str(tmp)))
    tmp.replace(onnx_path)
    image = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = [t.numpy() for t in wrapper(image)]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(OUTPUT_NAMES, {"image": image.numpy()})
    diffs = {name: float(np.abs(e - g).max()) for name, e, g in zip(OUTPUT_NAMES, expected, got)}
    report = {"onnx": str(onnx_path), "input_size": size, "max_abs_diff": diffs, "atol": atol,
              "classes": payload["classes"], "output_stride": model.output_stride}
    atomic_write_json(onnx_path.with_suffix(".check.json"), report)
    bad = {k: v for k, v in diffs.items() if not v <= atol}
    if bad:
        raise RuntimeError(f"{onnx_path}: onnxruntime differs from torch beyond atol={atol}: {bad}")
    return report
