"""High-resolution costs: peak memory, training throughput and latency of CflowPlus at 256² up to 1024².

For each input size, three fresh processes (so that each peak RSS is its own):

* ``infer``: build the model with the packaged ImageNet weights, score one image in eager torch, batch 1.
  Peak RSS, then the median latency of 5 more images.
* ``train``: ``Engine.fit`` for one epoch on 8 demo images at that size (batch 4: two batches); images/s of
  the training epoch, and the fit's peak RSS.
* ``export`` then ``openvino``: one process exports to OpenVINO at that size; another loads the IR and scores
  one image (the peak RSS of a deployment), then the median latency with OpenVINO's default precision (bf16
  on this CPU) and with ``f32``.

Usage::

    python benchmarks/high_resolution.py                      # 256x256, 512x512, 512x1280, 1024x1024
    python benchmarks/high_resolution.py --sizes 256x256 1024x1024

Writes ``benchmarks/out/high_resolution.json`` and prints a markdown table, with each figure's growth
against 256² beside the growth of the pixel count.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's plugin, not an installed copy

import argparse
import json
import logging
import statistics
import subprocess
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any

from memory import process_peak_rss_mb

OUT_DIR = Path(__file__).resolve().parent / "out"

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
    model.load_pretrained_encoder()
    return model.eval()


def infer_job(size: tuple[int, int], threads: int) -> dict[str, float]:
    """Peak RSS of scoring one image, and the median eager latency (ms) at batch 1."""
    import torch

    torch.set_num_threads(threads)
    model = build_model(size)
    image = torch.rand(1, 3, *size)
    with torch.no_grad():
        output = model(image)
        peak = process_peak_rss_mb()
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            model(image)
            times.append((time.perf_counter() - start) * 1e3)
    assert tuple(output.anomaly_map.shape[-2:]) == size
    return {"infer_peak_rss_mb": peak, "eager_ms": statistics.median(times)}


def train_job(size: tuple[int, int], threads: int) -> dict[str, float]:
    """Training images/s over one epoch of ``TRAIN_IMAGES`` demo images at ``size``, and the fit's peak RSS.

    The epoch's time runs from its start to its end: the optimizer steps, not the data check, the calibration
    pass or the report that a fit also makes.
    """
    import torch
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from lightning.pytorch import Callback

    class EpochTimer(Callback):
        seconds = float("nan")

        def on_train_epoch_start(self, *args: Any) -> None:
            self.start = time.perf_counter()

        def on_train_epoch_end(self, *args: Any) -> None:
            self.seconds = time.perf_counter() - self.start

    from anomalib_cflow_plus.data import generate_demo_dataset

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as work:
        root = generate_demo_dataset(
            Path(work) / "demo", textures=("brick",), image_size=size, n_train=TRAIN_IMAGES, n_test_good=1,
            n_test_defect=1, defects=("scratch",),
        )  # fmt: skip
        datamodule = MVTecAD(root=root, category="brick", train_batch_size=4, eval_batch_size=4, num_workers=0)
        model = build_model(size)
        timer = EpochTimer()
        engine = Engine(
            max_epochs=1, accelerator="cpu", devices=1, logger=False, default_root_dir=work, callbacks=[timer],
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        )  # fmt: skip
        engine.fit(model, datamodule=datamodule)
    return {"train_images_per_s": TRAIN_IMAGES / timer.seconds, "train_peak_rss_mb": process_peak_rss_mb()}


def export_job(size: tuple[int, int], threads: int, xml: Path) -> dict[str, float]:
    """Export to OpenVINO at ``size`` (``model.to_openvino``, as ``Engine.export`` does) as ``xml``; its wall time."""
    import torch

    torch.set_num_threads(threads)
    model = build_model(size)
    start = time.perf_counter()
    exported = Path(model.to_openvino(export_root=xml.parent / "export", input_size=size))
    elapsed = time.perf_counter() - start
    exported.replace(xml)
    exported.with_suffix(".bin").replace(xml.with_suffix(".bin"))
    return {"export_s": elapsed}


def openvino_job(size: tuple[int, int], threads: int, xml: Path) -> dict[str, float]:
    """Peak RSS of an OpenVINO deployment scoring one image, and median latency (ms), default precision and f32."""
    import numpy as np
    import openvino as ov

    core = ov.Core()
    image = np.random.default_rng(0).random((1, 3, *size), dtype=np.float32)
    results: dict[str, float] = {}
    for name, config in (("openvino_ms", {}), ("openvino_f32_ms", {"INFERENCE_PRECISION_HINT": "f32"})):
        compiled = core.compile_model(str(xml), "CPU", config | {"INFERENCE_NUM_THREADS": threads})
        compiled(image)
        if name == "openvino_ms":
            results["openvino_peak_rss_mb"] = process_peak_rss_mb()
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            compiled(image)
            times.append((time.perf_counter() - start) * 1e3)
        results[name] = statistics.median(times)
        del compiled
    return results


def run_child(job: str, size: tuple[int, int], threads: int, xml: Path) -> dict[str, float]:
    """Run one job in a fresh process and return its figures."""
    command = [sys.executable, __file__, "--job", job, "--sizes", f"{size[0]}x{size[1]}", "--threads", str(threads)]
    completed = subprocess.run([*command, "--xml", str(xml)], capture_output=True, text=True, check=False)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        print(completed.stderr[-3000:], file=sys.stderr)
        return {f"{job}_error": completed.returncode}
    return json.loads(lines[-1])


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
    parser.add_argument("--job", choices=["infer", "train", "export", "openvino"], help=argparse.SUPPRESS)
    parser.add_argument("--xml", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [parse_size(text) for text in args.sizes]

    if args.job:
        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
        jobs = {"infer": infer_job, "train": train_job}
        if args.job in jobs:
            figures = jobs[args.job](sizes[0], args.threads)
        else:
            figures = (export_job if args.job == "export" else openvino_job)(sizes[0], args.threads, args.xml)
        print(json.dumps(figures))
        return

    rows = []
    with tempfile.TemporaryDirectory() as work:
        for size in sizes:
            row: dict[str, Any] = {"size": f"{size[0]}x{size[1]}", "megapixels": size[0] * size[1] / 1e6}
            xml = Path(work) / f"{size[0]}x{size[1]}" / "model.xml"
            xml.parent.mkdir(parents=True)
            for job in ("infer", "train", "export", "openvino"):
                row |= run_child(job, size, args.threads, xml)
            print(f"  {row['size']}: {row}", flush=True)
            rows.append(row)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
