"""Compare CflowPlus training recipes on the demo data: accuracy after the same epochs, and fit time.

Each variant is a set of ``CflowPlus`` keyword arguments (``training_recipe``, ``fiber_batch_size``,
``lr``); every variant trains on every texture with the same seed, data and epochs, and is tested
with anomalib's ``Engine``. This is the measurement behind the ``fast`` recipe's defaults.

Usage::

    python benchmarks/recipes.py                                # default variants, 3 textures, 3 epochs
    python benchmarks/recipes.py --variants paper fast --textures brick --epochs 1
    python benchmarks/recipes.py --extra 'fast_lr1e-3={"training_recipe": "fast", "lr": 0.001}'

Writes ``benchmarks/out/recipes.json`` and prints a markdown table (means over textures).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from harness import DEFAULT_SEED, OUT_DIR, EpochTimer, cpu_engine, demo_datamodule, extract_metrics, quiet_libraries
from lightning.pytorch import seed_everything

from anomalib_cflow_plus import CflowPlus
from anomalib_cflow_plus.data import DEMO_TEXTURES, generate_demo_dataset

VARIANTS: dict[str, dict[str, Any]] = {
    "paper": {"training_recipe": "paper"},
    "fast": {"training_recipe": "fast"},
}


def parse_common_arguments(
    parser: argparse.ArgumentParser, json_name: str, argv: Sequence[str] | None
) -> argparse.Namespace:
    """Add the options every demo-data training benchmark shares, parse, and apply the thread count."""
    parser.add_argument("--textures", nargs="+", default=list(DEMO_TEXTURES), choices=DEMO_TEXTURES)
    parser.add_argument("--backbone", default="efficientnet_lite1")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=OUT_DIR / json_name)
    args = parser.parse_args(argv)
    quiet_libraries()
    torch.set_num_threads(args.threads)
    return args


def prepare_demo_data(textures: Sequence[str]) -> Path:
    """Write (once) the benchmark-size demo data of ``textures``: 256 px, 64 train, 16 + 8 test images each."""
    data_root = OUT_DIR / "data"
    generate_demo_dataset(data_root, textures=textures, image_size=256, n_train=64, n_test_good=16, n_test_defect=8)
    return data_root


def parse_extra(specs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``name={json kwargs}`` strings -> variants."""
    variants = {}
    for spec in specs:
        name, _, kwargs = spec.partition("=")
        variants[name] = json.loads(kwargs)
    return variants


def train_and_test(variant: dict[str, Any], backbone: str, texture: str, data_root: Path, epochs: int) -> dict:
    """Fit and test one variant on one texture; return metrics and timings."""
    seed_everything(DEFAULT_SEED, workers=True)
    model = CflowPlus(backbone=backbone, **variant)
    datamodule = demo_datamodule(data_root, texture)
    timer = EpochTimer()
    engine = cpu_engine(OUT_DIR / "runs" / "recipes", epochs, [timer])
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    metrics = extract_metrics(engine.test(model=model, datamodule=datamodule, verbose=False))
    return {"texture": texture, "metrics": metrics, "fit_seconds": fit_seconds, "epoch_seconds": timer.seconds}


def summarize(results: dict[str, list[dict]]) -> str:
    """Markdown table: per variant, metric means over textures and fit time relative to the first variant."""
    names = list(results)
    reference = statistics.fmean(run["fit_seconds"] for run in results[names[0]])
    lines = [
        "| variant | image AUROC | pixel AUROC | AUPRO | worst image AUROC | fit s | fit time ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        runs = results[name]
        mean = {key: statistics.fmean(run["metrics"][key] for run in runs) for key in runs[0]["metrics"]}
        worst = min(run["metrics"]["image_auroc"] for run in runs)
        fit = statistics.fmean(run["fit_seconds"] for run in runs)
        lines.append(
            f"| {name} | {mean['image_auroc']:.3f} | {mean['pixel_auroc']:.3f} | {mean['aupro']:.3f} | {worst:.3f} "
            f"| {fit:.1f} | {fit / reference:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every variant on every texture; print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help=f"built-in variants: {list(VARIANTS)}")
    parser.add_argument("--extra", nargs="*", default=[], help="more variants as name={json kwargs}")
    args = parse_common_arguments(parser, "recipes.json", argv)
    variants = {name: VARIANTS[name] for name in args.variants} | parse_extra(args.extra)
    data_root = prepare_demo_data(args.textures)
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for texture in args.textures:
        for name, variant in variants.items():
            run = train_and_test(variant, args.backbone, texture, data_root, args.epochs)
            results[name].append(run)
            print(f"{name} {texture}: {run['metrics']} fit {run['fit_seconds']:.1f} s", flush=True)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"variants": variants, "backbone": args.backbone, "results": results}))
    print()
    print(summarize(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
