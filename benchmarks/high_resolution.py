"""High-resolution costs: peak memory, training throughput and latency of CflowPlus at 256² up to 1024².

For each input size, four fresh processes (``jobs.run_job``, so that each peak RSS is its own):

* ``infer``: build the model with the packaged ImageNet weights, score one image in eager torch, batch 1.
  Peak RSS, then the median latency of 5 more images.
* ``train``: ``Engine.fit`` for one epoch on 8 demo images at that size (batch 4: two batches); images/s of
  the training epoch, and the fit's peak RSS.
* ``export`` then ``openvino``: one process exports to OpenVINO at that size; another loads the IR and scores
  one image (the peak RSS of a deployment), then the median latency with OpenVINO's default precision (bf16
  on this CPU) and with ``f32``.

Usage::

    python -m benchmarks.high_resolution                      # 256x256, 512x512, 512x1280, 1024x1024
    python -m benchmarks.high_resolution --sizes 256x256 1024x1024

Writes ``benchmarks/out/high_resolution.json`` (job logs in ``benchmarks/out/high_resolution/``) and prints a
markdown table, with each figure's growth against 256² beside the growth of the pixel count. Only the standard
library is imported here: each job imports what it measures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.jobs import OUT_DIR, peak_rss_mb, run_job, serve

MODULE = "benchmarks.high_resolution"
REPEATS = 5
TRAIN_IMAGES = 8


def parse_size(text: str) -> tuple[int, int]:
    """``"512x1280"`` -> ``(512, 1280)`` (height x width)."""
    height, width = (int(side) for side in text.lower().split("x"))
    return height, width


def build_model(size: tuple[int, int]) -> Any:
    """CflowPlus at ``size``, its encoder holding the packaged ImageNet weights."""
    from anomalib_cflow_plus import CflowPlus

    model = CflowPlus(pre_processor=CflowPlus.configure_pre_processor(image_size=size), pre_trained=True)
    model.model.load_pretrained(model.weights)
    from benchmarks.pair_models import calibrate_for_timing

    return calibrate_for_timing(model, size).eval()


def infer_job(spec: dict[str, Any]) -> dict[str, float]:
    """Peak RSS of scoring one image, and the median eager latency (ms) at batch 1."""
    import torch

    size = tuple(spec["size"])
    torch.set_num_threads(spec["threads"])
    model = build_model(size)
    image = torch.rand(1, 3, *size)
    with torch.no_grad():
        output = model(image)
        peak = peak_rss_mb()
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            model(image)
            times.append((time.perf_counter() - start) * 1e3)
    assert tuple(output.anomaly_map.shape[-2:]) == size
    return {"infer_peak_rss_mb": peak, "eager_ms": statistics.median(times)}


def train_job(spec: dict[str, Any]) -> dict[str, float]:
    """Training images/s over one epoch of ``TRAIN_IMAGES`` demo images at ``size``, and the fit's peak RSS.

    The epoch's time runs from its start to its end: the optimizer steps, not the data check, the calibration
    pass or the report that a fit also makes.
    """
    import torch

    from anomalib_cflow_plus.data import generate_demo_dataset
    from benchmarks.harness import EpochTimer, cpu_engine, demo_datamodule

    size = tuple(spec["size"])
    torch.set_num_threads(spec["threads"])
    with tempfile.TemporaryDirectory() as work:
        root = generate_demo_dataset(
            Path(work) / "demo", textures=("brick",), image_size=size, n_train=TRAIN_IMAGES, n_test_good=1,
            n_test_defect=1, defects=("scratch",),
        )  # fmt: skip
        timer = EpochTimer()
        engine = cpu_engine(Path(work), 1, [timer], limit_val_batches=0)
        engine.fit(build_model(size), datamodule=demo_datamodule(root, "brick", batch_size=4, num_workers=0))
    return {"train_images_per_s": TRAIN_IMAGES / timer.seconds[0], "train_peak_rss_mb": peak_rss_mb()}


def export_job(spec: dict[str, Any]) -> dict[str, float]:
    """Export to OpenVINO at ``size`` (``model.to_openvino``, as ``Engine.export`` does) as ``xml``; its wall time."""
    import torch

    size, xml = tuple(spec["size"]), Path(spec["xml"])
    torch.set_num_threads(spec["threads"])
    model = build_model(size)
    start = time.perf_counter()
    exported = Path(model.to_openvino(export_root=xml.parent / "export", input_size=size))
    elapsed = time.perf_counter() - start
    exported.replace(xml)
    exported.with_suffix(".bin").replace(xml.with_suffix(".bin"))
    return {"export_s": elapsed}


def openvino_job(spec: dict[str, Any]) -> dict[str, float]:
    """Peak RSS of an OpenVINO deployment scoring one image, and median latency (ms), default precision and f32."""
    import numpy as np
    import openvino as ov

    core = ov.Core()
    image = np.random.default_rng(0).random((1, 3, *spec["size"]), dtype=np.float32)
    results: dict[str, float] = {}
    for name, config in (("openvino_ms", {}), ("openvino_f32_ms", {"INFERENCE_PRECISION_HINT": "f32"})):
        compiled = core.compile_model(spec["xml"], "CPU", config | {"INFERENCE_NUM_THREADS": spec["threads"]})
        compiled(image)
        if name == "openvino_ms":
            results["openvino_peak_rss_mb"] = peak_rss_mb()
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            compiled(image)
            times.append((time.perf_counter() - start) * 1e3)
        results[name] = statistics.median(times)
        del compiled
    return results


JOBS = {"infer": infer_job, "train": train_job, "export": export_job, "openvino": openvino_job}  # in this order


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: each figure per size, and its growth against the first size beside the pixel count's."""
    figures = (
        ("infer_peak_rss_mb", "inference peak RSS MiB (eager)", 0),
        ("openvino_peak_rss_mb", "inference peak RSS MiB (OpenVINO)", 0),
        ("train_peak_rss_mb", "training peak RSS MiB (batch 4)", 0),
        ("train_images_per_s", "training images/s", 2),
        ("eager_ms", "eager ms/img (batch 1)", 0),
        ("openvino_ms", "OpenVINO default (bf16) ms/img", 0),
        ("openvino_f32_ms", "OpenVINO f32 ms/img", 0),
        ("export_s", "OpenVINO export s", 0),
    )
    base = rows[0]
    header = " | ".join(f"{row['size']} ({row['megapixels']:.2f} MP)" for row in rows)
    lines = [f"| figure | {header} |", "|" + "---|" * (1 + len(rows))]
    growth = " | ".join(f"{row['megapixels'] / base['megapixels']:.1f}x" for row in rows)
    lines.append(f"| pixels, against {base['size']} | {growth} |")
    for key, label, digits in figures:
        cells = []
        for row in rows:
            if key not in row:
                cells.append("")
                continue
            ratio = row[key] / base[key] if base.get(key) else float("nan")
            cells.append(f"{row[key]:.{digits}f} ({ratio:.1f}x)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["256x256", "512x512", "512x1280", "1024x1024"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=OUT_DIR / "high_resolution.json")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for height, width in (parse_size(text) for text in args.sizes):
            row: dict[str, Any] = {"size": f"{height}x{width}", "megapixels": height * width / 1e6}
            xml = Path(work) / row["size"] / "model.xml"
            xml.parent.mkdir(parents=True)
            spec = {"size": [height, width], "threads": args.threads, "xml": str(xml)}
            for job in JOBS:
                result = run_job(MODULE, job, spec, OUT_DIR / "high_resolution", f"{job}-{row['size']}")
                row |= {f"{job}_error": result["error"]} if "error" in result else result
            print(f"  {row['size']}: {row}", flush=True)
            rows.append(row)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2))
    print(table(rows))


if __name__ == "__main__":
    if sys.argv[1:2] and sys.argv[1] in JOBS:  # a job process of run_job
        serve(JOBS)
    else:
        main()
