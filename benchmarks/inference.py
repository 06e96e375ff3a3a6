"""Inference latency of one CflowPlus model, side by side: eager torch and OpenVINO, whole pipeline.

Every backend runs the same exported pipeline (resize + normalize, encoder, flows, anomaly map and
post-processing) on the same (B, 3, 256, 256) images. Backends are timed round-robin, one call each
per round in a rotating order, and the median over rounds is reported, so machine noise hits every
backend alike. Speed does not depend on the weights, so the model is untrained (its ActNorms
initialized on random features).

Usage::

    python -m benchmarks.inference [--backbone efficientnet_lite1] [--batch 1 8] [--repeats 20]

Writes ``benchmarks/out/inference.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openvino as ov
import torch
from anomalib.deploy import ExportType
from anomalib.engine import Engine

from anomalib_cflow_plus import CflowPlus
from benchmarks.jobs import OUT_DIR
from benchmarks.pair_models import calibrate_for_timing
from benchmarks.timing import round_robin_ms

IMAGE_SIZE = (256, 256)


def build_model(backbone: str) -> CflowPlus:
    """An eval-mode CflowPlus with pretrained encoder and initialized ActNorms."""
    model = CflowPlus(backbone=backbone)
    model.model.load_pretrained(model.weights)
    model.model.initialize_normalization(model.model.encode(torch.rand(2, 3, *IMAGE_SIZE)))
    return calibrate_for_timing(model, IMAGE_SIZE).eval()


def openvino_runner(path: Path, config: dict[str, str]) -> Callable[[np.ndarray], object]:
    """A compiled OpenVINO model on the CPU as a callable on NCHW float arrays."""
    compiled = ov.Core().compile_model(path, "CPU", config)
    return lambda images: compiled(images)


def main() -> None:
    """Export, time every backend at every batch size, print and save the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite1")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model(args.backbone)
    with tempfile.TemporaryDirectory() as export_root:
        start = time.perf_counter()
        path = Engine().export(model, ExportType.OPENVINO, export_root=export_root, input_size=IMAGE_SIZE)
        export_s = time.perf_counter() - start
        threads = {"INFERENCE_NUM_THREADS": str(args.threads)}
        f32 = openvino_runner(path, {"INFERENCE_PRECISION_HINT": "f32", **threads})
        default = openvino_runner(path, threads)
        results = []
        for batch in args.batch:
            images = torch.rand(batch, 3, *IMAGE_SIZE)
            array = images.numpy()
            with torch.no_grad():
                samples = round_robin_ms(
                    {
                        "torch eager": lambda images=images: model(images),
                        "torch encoder alone": lambda images=images: model.model.encode(model.pre_processor(images)),
                        "OpenVINO f32 hint": lambda array=array: f32(array),
                        "OpenVINO default": lambda array=array: default(array),
                    },
                    args.repeats,
                )
            per_call = {name: statistics.median(values) for name, values in samples.items()}
            results.append({"batch": batch, "ms_per_image": {name: ms / batch for name, ms in per_call.items()}})

    print(f"{args.backbone}, {IMAGE_SIZE[0]} px, {args.threads} threads, OpenVINO export {export_s:.1f} s\n")
    print("| batch | " + " | ".join(results[0]["ms_per_image"]) + " |")
    print("|---" * (len(results[0]["ms_per_image"]) + 1) + "|")
    for row in results:
        reference = row["ms_per_image"]["torch eager"]
        cells = [f"{ms:.1f} ({reference / ms:.2f}x)" for ms in row["ms_per_image"].values()]
        print(f"| {row['batch']} | " + " | ".join(cells) + " |")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    report = {"backbone": args.backbone, "threads": args.threads, "export_s": export_s, "results": results}
    (OUT_DIR / "inference.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
