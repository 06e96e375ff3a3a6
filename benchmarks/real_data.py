"""Real-data benchmark: CflowPlus side by side with anomalib's Cflow, PatchCore and FastFlow, in one run.

Every model trains and tests on every category of ``--data-root`` (default ``../shared/realdev``, real
photographs with pixel masks in MVTec AD layout) and on the demo textures, with the same encoder
(``--backbone``, default CflowPlus's) and the same packaged ImageNet weights, copied into each model's
encoder (no hub), at the same input size (resize to ``--image-size``, ImageNet normalization), with the
same evaluator (image AUROC, pixel AUROC, AUPRO). Each model keeps the layers it uses by default for
that kind of backbone. Every job runs in a fresh process, one after another, so that peak memory and
time are its own.

Usage::

    python -m benchmarks.real_data                        # CflowPlus x 3 seeds, peers x 1 seed
    python -m benchmarks.real_data --models CflowPlus --seeds 0 1 2
    python -m benchmarks.real_data --report benchmarks/out/real_data.json

Job results are cached in ``benchmarks/out/real_data/jobs/``, keyed by the job's spec (and, for
CflowPlus, by a hash of the plugin's source), so a peer's result is reused until its data, encoder or
anomalib change. ``--fresh`` reruns everything. Writes ``benchmarks/out/real_data.json`` and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    DEFAULT_REALDEV_ROOT,
    DEMO_PREFIX,
    METRICS,
    OUT_DIR,
    cflow_plus_source,
    format_spread,
    is_real,
    mean_and_spread,
    real_categories,
    real_data_job,
)

DEMO_DATASETS = tuple(f"{DEMO_PREFIX}{texture}" for texture in ("brick", "grass", "gravel"))
CFLOW_PLUS = "CflowPlus"
CFLOW_PLUS_PAPER = "CflowPlus paper"
CFLOW_PLUS_LONG = "CflowPlus 8 epochs"
CFLOW_PLUS_BF16 = "CflowPlus bf16-mixed"
LONG_EPOCHS = 8
PEERS = ("Cflow", "Patchcore", "Fastflow", "Padim")
# The first six run by default; the others on request (--models).
MODELS = (CFLOW_PLUS, CFLOW_PLUS_PAPER, *PEERS, CFLOW_PLUS_LONG, CFLOW_PLUS_BF16)
# What each model is given beyond the shared settings; the table's notes say so.
MODEL_NOTES: dict[str, str] = {
    CFLOW_PLUS: "defaults",
    CFLOW_PLUS_PAPER: 'training_recipe="paper"',
    CFLOW_PLUS_LONG: f"defaults, {LONG_EPOCHS} epochs (the configs' schedule)",
    CFLOW_PLUS_BF16: 'defaults, Engine(precision="bf16-mixed")',
    "Cflow": "anomalib defaults (N=64, lr 1e-4), CflowPlus's default layers",
    "Patchcore": "1 epoch, coreset 10%, at most --patchcore-images training images",
    "Fastflow": "anomalib defaults, its last 3 feature levels",
    "Padim": "anomalib defaults, strides 4/8/16, 100 random channels of 176",
}


def job_spec(model: str, dataset: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Everything a job's result depends on."""
    spec: dict[str, Any] = {
        "model": model,
        "dataset": dataset,
        "data_root": str(args.data_root.resolve()),
        "seed": seed,
        "backbone": args.backbone,
        "image_size": args.image_size,
        "epochs": {"Patchcore": 1, "Padim": 1, CFLOW_PLUS_LONG: LONG_EPOCHS}.get(model, args.epochs),
        "threads": args.threads,
    }
    if model == "Patchcore":
        spec["max_train_images"] = args.patchcore_images
    if model == CFLOW_PLUS_BF16:
        spec["precision"] = "bf16-mixed"
    if model.startswith(CFLOW_PLUS):
        spec["source"] = cflow_plus_source()
    else:
        from importlib.metadata import version

        spec["anomalib"] = version("anomalib")
    return spec


def summarize(results: list[dict[str, Any]], models: Sequence[str], datasets: Sequence[str]) -> dict[str, Any]:
    """Per model: per data set and over the real ones, the mean and spread over seeds of every figure."""
    summary: dict[str, Any] = {}
    real = [dataset for dataset in datasets if is_real(dataset)]
    figures = (*METRICS, "train_s", "test_ms_per_image", "peak_rss_mb", "checkpoint_mb")
    for model in models:
        runs = [r for r in results if r["model"] == model and "error" not in r]
        if not runs:
            continue
        entry: dict[str, Any] = {}
        for figure in figures:
            per_dataset = {
                dataset: mean_and_spread(r[figure] for r in runs if r["dataset"] == dataset)
                for dataset in datasets
                if any(r["dataset"] == dataset for r in runs)
            }
            per_seed = []
            for seed in sorted({r["seed"] for r in runs}):
                values = [r[figure] for r in runs if r["seed"] == seed and r["dataset"] in real]
                if len(values) == len(real):
                    per_seed.append(statistics.fmean(values))
            if per_seed:
                per_dataset["real mean"] = mean_and_spread(per_seed)
            entry[figure] = per_dataset
        entry["seeds"] = sorted({r["seed"] for r in runs})
        summary[model] = entry
    return summary


def markdown_tables(summary: dict[str, Any], datasets: Sequence[str]) -> str:
    """The accuracy table (one row per model and data set) and the cost table."""
    columns = ["real mean", *datasets]
    lines = ["| model | seeds | figure | " + " | ".join(columns) + " |", "|" + "---|" * (3 + len(columns))]
    for model, entry in summary.items():
        for metric in METRICS:
            cells = [format_spread(entry[metric][c]) if c in entry[metric] else "" for c in columns]
            lines.append(f"| {model} | {len(entry['seeds'])} | {metric} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| model | given | train s (real mean) | test ms/img | peak RSS MiB | checkpoint MiB |",
        "|---|---|---|---|---|---|",
    ]
    for model, entry in summary.items():

        def cell(figure: str, digits: int = 0, entry: dict[str, Any] = entry) -> str:
            values = entry[figure].get("real mean")
            return format_spread(values, digits) if values else ""

        lines.append(
            f"| {model} | {MODEL_NOTES.get(model, '')} | {cell('train_s')} | {cell('test_ms_per_image', 1)} "
            f"| {cell('peak_rss_mb')} | {cell('checkpoint_mb', 1)} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_REALDEV_ROOT)
    parser.add_argument("--datasets", nargs="+", default=None, help="default: every real category and demo texture")
    parser.add_argument("--models", nargs="+", default=list(MODELS[:6]), choices=MODELS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="CflowPlus's seeds")
    parser.add_argument("--peer-seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--backbone", default="efficientnet_lite1")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--patchcore-images", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--json", type=Path, default=OUT_DIR / "real_data.json")
    parser.add_argument("--report", type=Path, default=None, help="reprint the tables of an existing JSON")
    args = parser.parse_args(argv)
    if args.report is not None:
        saved = json.loads(args.report.read_text())
        print(markdown_tables(saved["summary"], saved["datasets"]))
        return
    if not args.data_root.is_dir():
        parser.error(f"--data-root {args.data_root} does not exist: point it at a folder in MVTec AD layout.")
    datasets = args.datasets or [*real_categories(args.data_root), *DEMO_DATASETS]
    results = []
    start = time.perf_counter()
    for model in args.models:
        seeds = args.seeds if model.startswith(CFLOW_PLUS) else args.peer_seeds
        for dataset in datasets:
            for seed in seeds:
                results.append(real_data_job(job_spec(model, dataset, seed, args), args.fresh))
    summary = summarize(results, args.models, datasets)
    report = {
        "datasets": datasets,
        "settings": {key: str(value) for key, value in vars(args).items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "wall_s": time.perf_counter() - start,
        "results": results,
        "summary": summary,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(markdown_tables(summary, datasets))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
