"""The accuracy-latency front: what each coupling block, hidden unit, layer and pixel buys on real parts.

Every *setting* is CflowPlus with one or two arguments changed from its defaults (coupling blocks ``K``, the
subnets' ``hidden_ratio``, the layer set, the input size). Each is trained and tested on every real category of
``--data-root`` (``real_data_job``: anomalib's ``Engine``, 3 epochs, the packaged lite1 weights, one fresh
process per job, results cached by spec) for ``--seeds``, and timed in OpenVINO (its default precision and
``f32``, batch 1, untrained models: weights do not change latency) side by side with the peers at their own
defaults and with CflowPlus's encoder (``deploy_speed.py``'s models), in one round-robin run.

Usage::

    python -m benchmarks.front                                   # train what is missing, time, table and plot
    python -m benchmarks.front --settings default K4 --seeds 0   # a subset
    python -m benchmarks.front --report benchmarks/out/front.json

Writes ``benchmarks/out/front.json`` and ``benchmarks/figures/front.png`` and prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    DEFAULT_REALDEV_ROOT,
    METRICS,
    OUT_DIR,
    cflow_plus_source,
    format_spread,
    mean_and_spread,
    real_categories,
    real_data_job,
)
from benchmarks.jobs import REPO_ROOT

FIGURE = REPO_ROOT / "benchmarks" / "figures" / "front.png"
LITE1_LEVELS = {4: "blocks.1", 8: "blocks.2", 16: "blocks.4", 32: "blocks.6"}

# name -> (CflowPlus arguments over its defaults, input size). "default" is CflowPlus as it ships.
SETTINGS: dict[str, tuple[dict[str, Any], int]] = {
    "default": ({}, 256),
    "K4": ({"coupling_blocks": 4}, 256),
    "K6": ({"coupling_blocks": 6}, 256),
    "width 0.5": ({"hidden_ratio": 0.5}, 256),
    "width 2": ({"hidden_ratio": 2.0}, 256),
    "strides 8/16": ({"layers": [LITE1_LEVELS[8], LITE1_LEVELS[16]]}, 256),
    "strides 4/8/16/32": ({"layers": [LITE1_LEVELS[s] for s in (4, 8, 16, 32)]}, 256),
    "384 px": ({}, 384),
    "K4 width 0.5": ({"coupling_blocks": 4, "hidden_ratio": 0.5}, 256),
}


def accuracy_spec(setting: str, dataset: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The ``real_data_job`` spec of one setting on one category and seed."""
    kwargs, image_size = SETTINGS[setting]
    return {
        "model": "CflowPlus",
        "model_kwargs": kwargs,
        "dataset": dataset,
        "data_root": str(args.data_root.resolve()),
        "seed": seed,
        "backbone": "efficientnet_lite1",
        "image_size": image_size,
        "epochs": args.epochs,
        "threads": args.threads,
        "source": cflow_plus_source(),
    }


def summarize_accuracy(results: list[dict[str, Any]], datasets: Sequence[str]) -> dict[str, Any]:
    """Per setting: each metric per category and as the mean over categories, mean and spread over seeds."""
    summary: dict[str, Any] = {}
    for setting in dict.fromkeys(r["setting"] for r in results):
        runs = [r for r in results if r["setting"] == setting and "error" not in r]
        seeds = sorted({r["seed"] for r in runs})
        entry: dict[str, Any] = {"seeds": seeds}
        for metric in (*METRICS, "train_s"):
            per_dataset = {
                dataset: mean_and_spread(r[metric] for r in runs if r["dataset"] == dataset)
                for dataset in datasets
                if any(r["dataset"] == dataset for r in runs)
            }
            per_seed = [
                statistics.fmean(values)
                for seed in seeds
                if len(values := [r[metric] for r in runs if r["seed"] == seed]) == len(datasets)
            ]
            if per_seed:
                per_dataset["mean"] = mean_and_spread(per_seed)
            entry[metric] = per_dataset
        summary[setting] = entry
    return summary


def accuracy_table(summary: dict[str, Any], datasets: Sequence[str]) -> str:
    """One row per setting: image AUROC / pixel AUROC / AUPRO, mean and per category."""
    columns = ["mean", *datasets]
    lines = [
        "| setting | seeds | " + " | ".join(columns) + " | train s (mean) |",
        "|" + "---|" * (3 + len(columns)),
    ]
    for setting, entry in summary.items():
        cells = []
        for column in columns:
            if column not in entry["image_auroc"]:
                cells.append("")
                continue
            cells.append(" / ".join(format_spread(entry[metric][column]) for metric in METRICS))
        train = entry["train_s"].get("mean")
        lines.append(
            f"| {setting} | {len(entry['seeds'])} | "
            + " | ".join(cells)
            + f" | {format_spread(train, 0) if train else ''} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_REALDEV_ROOT)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--json", type=Path, default=OUT_DIR / "front.json")
    args = parser.parse_args(argv)
    datasets = real_categories(args.data_root)
    start = time.perf_counter()
    results = []
    for seed in args.seeds:
        for setting in args.settings:
            for dataset in datasets:
                spec = accuracy_spec(setting, dataset, seed, args)
                results.append({"setting": setting, **real_data_job(spec, args.fresh)})
    summary = summarize_accuracy(results, datasets)
    report = {
        "datasets": datasets,
        "settings": {name: SETTINGS[name] for name in args.settings},
        "wall_s": time.perf_counter() - start,
        "results": results,
        "accuracy": summary,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(accuracy_table(summary, datasets))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
