"""What a position-calibrated image score costs: checkpoint and IR size, OpenVINO latency, calibration time.

Two CflowPlus models with the same weights (defaults, packaged encoder, ActNorms initialized on random features)
are calibrated on the same random images, one with ``image_calibration="layer"`` (today's scoring) and one with
``"position"`` (what ``"auto"`` picks for aligned parts), exported to OpenVINO at 256 px and timed side by side,
round-robin, at the f32 hint and at OpenVINO's default precision, batch 1 and 8 (median of ``--repeats`` rounds
and the median of per-round ratios). Speed does not depend on the weights.

Usage::

    python -m benchmarks.normalization_cost [--repeats 30] [--threads 2]

Writes ``benchmarks/out/normalization_cost.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import tempfile
import time
from pathlib import Path

import openvino as ov
import torch

from anomalib_cflow_plus import CflowPlus
from anomalib_cflow_plus.calibration import calibrate
from benchmarks.harness import OUT_DIR, paired_ratio, write_json
from benchmarks.timing import round_robin_ms

IMAGE_SIZE = (256, 256)


def calibrated_pair(images: list[torch.Tensor]) -> dict[str, CflowPlus]:
    """The same model twice, calibrated by layer and by position, with the calibration's wall time."""
    model = CflowPlus(image_calibration="layer", visualizer=False)
    model.model.load_pretrained(model.weights)
    model.model.initialize_normalization(model.model.encode(torch.rand(2, 3, *IMAGE_SIZE)))
    position = copy.deepcopy(model)
    position.model.image_calibration = "position"
    models = {"layer": model.eval(), "position": position.eval()}
    for name, candidate in models.items():
        start = time.perf_counter()
        calibrate(candidate.model, [candidate.pre_processor.transform(batch) for batch in images], torch.device("cpu"))
        candidate.calibration_s = time.perf_counter() - start
        assert candidate.model.anomaly_map.position_calibrated == (name == "position")
    return models


def checkpoint_mb(model: CflowPlus) -> float:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration-images", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = [torch.rand(16, 3, *IMAGE_SIZE) for _ in range(args.calibration_images // 16)]
    models = calibrated_pair(images)
    report: dict = {"threads": args.threads, "repeats": args.repeats, "models": {}, "latency": []}
    runners = {}
    with tempfile.TemporaryDirectory() as root:
        for name, model in models.items():
            path = Path(model.to_openvino(export_root=Path(root) / name, input_size=IMAGE_SIZE))
            report["models"][name] = {
                "checkpoint_mb": checkpoint_mb(model),
                "ir_mb": path.with_suffix(".bin").stat().st_size / 2**20,
                "calibration_s": model.calibration_s,
            }
            threads = {"INFERENCE_NUM_THREADS": str(args.threads)}
            for precision, config in (("f32", {"INFERENCE_PRECISION_HINT": "f32", **threads}), ("default", threads)):
                compiled = ov.Core().compile_model(ov.Core().read_model(path), "CPU", config)
                runners[(name, precision)] = compiled
        for batch in (1, 8):
            array = torch.rand(batch, 3, *IMAGE_SIZE).numpy()
            for precision in ("f32", "default"):
                pair = {name: runners[(name, precision)] for name in models}
                samples = round_robin_ms({n: lambda c=c, a=array: c(a) for n, c in pair.items()}, args.repeats)
                report["latency"].append(
                    {
                        "batch": batch,
                        "precision": precision,
                        "ms_per_image": {name: statistics.median(values) / batch for name, values in samples.items()},
                        "position_over_layer": paired_ratio(samples["position"], samples["layer"]),
                    }
                )
    write_json(OUT_DIR / "normalization_cost.json", report)
    print(f"| image calibration | checkpoint MiB | IR MiB | calibration s ({args.calibration_images} images) |")
    print("|---|---|---|---|")
    for name, figures in report["models"].items():
        print(f"| {name} | {figures['checkpoint_mb']:.2f} | {figures['ir_mb']:.2f} | {figures['calibration_s']:.1f} |")
    print("\n| batch | OpenVINO precision | layer ms/img | position ms/img | position / layer (median of rounds) |")
    print("|---|---|---|---|---|")
    for row in report["latency"]:
        ms = row["ms_per_image"]
        print(
            f"| {row['batch']} | {row['precision']} | {ms['layer']:.1f} | {ms['position']:.1f} "
            f"| {row['position_over_layer']:.3f} |"
        )


if __name__ == "__main__":
    main()
