"""Export time of CflowPlus through ``Engine.export``: torch, ONNX and OpenVINO, with and without the export mixin.

Builds ``CflowPlus(backbone=...)`` untrained (export time does not depend on the weights; the ActNorms are
initialized on random features) and times ``Engine.export`` at ``--size`` px for each export type, twice:

- ``stock``: anomalib's own ``ExportMixin.to_onnx`` at opset 18 (the path before ``CflowPlusExportMixin``:
  in-place activations, onnxscript's full optimizer);
- ``mixin``: :class:`anomalib_cflow_plus.export.CflowPlusExportMixin` (out-of-place activations while
  tracing, constant folding only).

Reports wall time and this process's CPU time (user + system of all its threads): on a shared machine the
CPU time is the steadier figure. The two variants alternate, ``--repeats`` rounds; medians are reported.

Usage::

    python -m benchmarks.export_speed                       # efficientnet_lite0 at 256 px, 1 round (~3 min)
    python -m benchmarks.export_speed --backbone efficientnet_lite1 --repeats 3

Writes ``benchmarks/out/export_speed.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import statistics
import tempfile
import time
import warnings

import torch
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from anomalib.models.components.base.export_mixin import ExportMixin

from anomalib_cflow_plus import CflowPlus
from anomalib_cflow_plus.export import ONNX_OPSET
from benchmarks.jobs import OUT_DIR
from benchmarks.pair_models import calibrate_for_timing


def build_model(backbone: str, size: int, stock: bool) -> CflowPlus:
    """An eval-mode model with initialized ActNorms; ``stock`` routes ``to_onnx`` to anomalib's own."""
    torch.manual_seed(0)
    model = CflowPlus(backbone=backbone, pre_trained=False)
    model.model.initialize_normalization(model.model.encode(torch.rand(2, 3, size, size)))
    calibrate_for_timing(model, size)
    if stock:  # to_openvino calls self.to_onnx: an instance attribute takes precedence over the class's method
        model.to_onnx = functools.partial(ExportMixin.to_onnx, model, opset_version=ONNX_OPSET)
    return model.eval()


def time_export(model: CflowPlus, export_type: ExportType, size: int) -> dict[str, float]:
    """Wall and CPU seconds of one ``Engine.export`` into a temporary folder."""
    engine = Engine(logger=False)
    with tempfile.TemporaryDirectory() as root:
        wall, cpu = time.perf_counter(), time.process_time()
        engine.export(model, export_type, export_root=root, input_size=(size, size))
        return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def main() -> None:
    """Time every export type with both variants, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    models = {variant: build_model(args.backbone, args.size, variant == "stock") for variant in ("stock", "mixin")}
    time_export(models["mixin"], ExportType.ONNX, args.size)  # warm-up: first-call imports and caches
    samples: dict[str, dict[str, list[dict[str, float]]]] = {}
    for _ in range(args.repeats):
        for export_type in (ExportType.TORCH, ExportType.ONNX, ExportType.OPENVINO):
            for variant, model in models.items():
                timing = time_export(model, export_type, args.size)
                samples.setdefault(export_type.value, {}).setdefault(variant, []).append(timing)
                print(f"{export_type.value:8s} {variant}: {timing['wall_s']:.1f} s wall, {timing['cpu_s']:.1f} s CPU")

    medians = {
        export_type: {
            variant: {key: statistics.median(run[key] for run in runs) for key in ("wall_s", "cpu_s")}
            for variant, runs in variants.items()
        }
        for export_type, variants in samples.items()
    }
    print(f"\n{args.backbone}, {args.size} px, median of {args.repeats} (s, wall / CPU):\n")
    print("| export | stock (anomalib's to_onnx, opset 18) | CflowPlusExportMixin |")
    print("|---|---|---|")
    for export_type, variants in medians.items():
        cells = [f"{variants[name]['wall_s']:.1f} / {variants[name]['cpu_s']:.1f}" for name in ("stock", "mixin")]
        print(f"| {export_type} | " + " | ".join(cells) + " |")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    report = {"backbone": args.backbone, "size": args.size, "samples": samples, "medians": medians}
    (OUT_DIR / "export_speed.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
