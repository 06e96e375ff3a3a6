"""Benchmark CflowPlus's EfficientNet-Lite backbones on the demo data: accuracy, fit time and CPU latency.

For every backbone and texture, train ``CflowPlus(backbone=...)`` (all other arguments default) with
anomalib's ``Engine`` on CPU, test it, and record image AUROC, pixel AUROC, pixel AUPRO and the fit
wall time. Then time the trained torch models at batch 1 (eager, ``torch.no_grad()``), with all
backbones interleaved round-robin so that machine noise hits each of them alike.

Usage::

    python -m benchmarks.backbones                  # full benchmark (3 backbones x 3 textures, 3 epochs)
    python -m benchmarks.backbones --quick          # tiny smoke run of the script itself
    python -m benchmarks.backbones --backbones efficientnet_lite0 --textures brick --epochs 1

Writes ``benchmarks/out/backbones.json`` (``backbones_quick.json`` with ``--quick``) and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import seed_everything

from anomalib_cflow_plus import CflowPlus
from anomalib_cflow_plus.data import DEMO_TEXTURES, generate_demo_dataset
from benchmarks.harness import (
    DEFAULT_SEED,
    METRIC_KEYS,
    OUT_DIR,
    EpochTimer,
    cpu_engine,
    demo_datamodule,
    environment,
    extract_metrics,
    mean,
    paired_ratio,
    quiet_libraries,
    write_json,
)
from benchmarks.timing import round_robin_ms

BACKBONES: tuple[str, ...] = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
# Test-metric names logged by CflowPlus's default evaluator -> short names used in the results.


@dataclass(frozen=True)
class BenchmarkConfig:
    """Everything one benchmark run depends on."""

    backbones: tuple[str, ...]
    textures: tuple[str, ...]
    epochs: int
    image_size: int
    n_train: int
    n_test_good: int
    n_test_defect: int
    latency_repeats: int
    latency_warmup: int
    threads: int
    seed: int
    data_root: Path
    runs_root: Path
    json_path: Path
    quick: bool


@dataclass
class RunResult:
    """Accuracy and fit time of one backbone on one texture."""

    backbone: str
    texture: str
    metrics: dict[str, float]
    fit_seconds: float
    epoch_seconds: list[float]
    test_seconds: float

    @property
    def fit_seconds_per_epoch(self) -> float:
        """Whole ``fit`` wall time (setup, training, per-epoch validation, calibration) per epoch."""
        return self.fit_seconds / max(len(self.epoch_seconds), 1)


@dataclass
class LatencyResult:
    """Batch-1 eager CPU latency of one backbone, in milliseconds per image."""

    backbone: str
    model_ms: float
    encoder_ms: float
    model_samples_ms: list[float] = field(repr=False)
    encoder_samples_ms: list[float] = field(repr=False)


# ------------------------------------------------------------------------------------------ configuration


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=None, help="training epochs per run (default: 3, quick: 1)")
    parser.add_argument("--textures", nargs="+", default=list(DEMO_TEXTURES), choices=DEMO_TEXTURES)
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--repeats", type=int, default=None, help="latency rounds (default: 30, quick: 5)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for training and timing (default: %(default)s; on a shared 2-core machine "
        "2 threads oversubscribe the CPUs and run several times slower and far noisier)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help="seed_everything before each run (default: %(default)s; other seeds write *_seed<N> outputs)",
    )
    parser.add_argument(
        "--report", type=Path, default=None, help="only recompute the summary and table of an existing backbones*.json"
    )
    parser.add_argument("--quick", action="store_true", help="tiny run to test the script: 128 px, 16 train images")
    return parser


def build_config(args: argparse.Namespace) -> BenchmarkConfig:
    """Turn parsed arguments into a config; ``--quick`` shrinks the data, epochs and latency rounds."""
    suffix = ("_quick" if args.quick else "") + (f"_seed{args.seed}" if args.seed != DEFAULT_SEED else "")
    return BenchmarkConfig(
        backbones=tuple(args.backbones),
        textures=tuple(args.textures),
        epochs=args.epochs or (1 if args.quick else 3),
        image_size=128 if args.quick else 256,
        n_train=16 if args.quick else 64,
        n_test_good=4 if args.quick else 16,
        n_test_defect=2 if args.quick else 8,
        latency_repeats=args.repeats or (5 if args.quick else 30),
        latency_warmup=2 if args.quick else 5,
        threads=args.threads,
        seed=args.seed,
        data_root=OUT_DIR / ("data_quick" if args.quick else "data"),
        runs_root=OUT_DIR / f"runs{suffix}",
        json_path=OUT_DIR / f"backbones{suffix}.json",
        quick=args.quick,
    )


# ------------------------------------------------------------------------------------------------ accuracy


def build_model(backbone: str, image_size: int) -> CflowPlus:
    """``CflowPlus`` with default arguments; only a non-default image size changes the pre-processor."""
    if image_size == 256:
        return CflowPlus(backbone=backbone)
    return CflowPlus(backbone=backbone, pre_processor=CflowPlus.configure_pre_processor((image_size, image_size)))


def train_and_test(backbone: str, texture: str, config: BenchmarkConfig) -> tuple[RunResult, CflowPlus]:
    """Fit and test one backbone on one texture; return its result and the trained model."""
    seed_everything(config.seed, workers=True)
    model = build_model(backbone, config.image_size)
    datamodule = demo_datamodule(config.data_root, texture)
    timer = EpochTimer()
    engine = cpu_engine(config.runs_root / backbone / texture, config.epochs, [timer])
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    test_results = engine.test(model=model, datamodule=datamodule, verbose=False)
    test_seconds = time.perf_counter() - start
    result = RunResult(
        backbone=backbone,
        texture=texture,
        metrics=extract_metrics(test_results),
        fit_seconds=fit_seconds,
        epoch_seconds=timer.seconds,
        test_seconds=test_seconds,
    )
    return result, model


# ------------------------------------------------------------------------------------------------- latency


def measure_latency(models: dict[str, CflowPlus], image_size: int, repeats: int, warmup: int) -> list[LatencyResult]:
    """Batch-1 eager latency of each model's full forward and of its encoder alone, interleaved round-robin.

    Every round times each backbone's full model and encoder once, in an order rotated by one per
    round (:func:`timing.round_robin_ms`); the median over the rounds is reported.
    """
    torch.manual_seed(DEFAULT_SEED)
    image = torch.randn(1, 3, image_size, image_size)  # already "normalized": the pre-processor is not timed
    torch_models = {name: model.model.eval() for name, model in models.items()}
    runners: dict[tuple[str, str], Callable[[], Any]] = {}
    for name, net in torch_models.items():
        runners[name, "model"] = lambda m=net: m(image)
        runners[name, "encoder"] = lambda m=net: m.encode(image)
    with torch.no_grad():
        timed = round_robin_ms(runners, repeats, warmup)
    samples = {name: {part: timed[name, part] for part in ("model", "encoder")} for name in torch_models}
    names = list(torch_models)
    return [
        LatencyResult(
            backbone=name,
            model_ms=statistics.median(samples[name]["model"]),
            encoder_ms=statistics.median(samples[name]["encoder"]),
            model_samples_ms=samples[name]["model"],
            encoder_samples_ms=samples[name]["encoder"],
        )
        for name in names
    ]


# ------------------------------------------------------------------------------------------------- report


def summarize(runs: Sequence[RunResult], latency: Sequence[LatencyResult]) -> list[dict[str, Any]]:
    """One summary row per backbone: metrics averaged over textures, per-texture metrics, timings.

    Latency ratios are relative to the first timed backbone, as medians of per-round ratios.
    """
    latency_by_name = {entry.backbone: entry for entry in latency}
    reference = latency[0] if latency else None
    rows = []
    for backbone in dict.fromkeys(run.backbone for run in runs):
        own = [run for run in runs if run.backbone == backbone]
        timing = latency_by_name.get(backbone)
        rows.append(
            {
                "backbone": backbone,
                **{short: mean([run.metrics[short] for run in own]) for short in METRIC_KEYS.values()},
                "per_texture": {run.texture: run.metrics for run in own},
                "fit_seconds_per_epoch": mean([run.fit_seconds_per_epoch for run in own]),
                "model_ms": timing.model_ms if timing else math.nan,
                "model_ratio_vs_first": (
                    paired_ratio(timing.model_samples_ms, reference.model_samples_ms) if timing else math.nan
                ),
                "encoder_ms": timing.encoder_ms if timing else math.nan,
                "encoder_ratio_vs_first": (
                    paired_ratio(timing.encoder_samples_ms, reference.encoder_samples_ms) if timing else math.nan
                ),
            },
        )
    return rows


def format_table(rows: Sequence[dict[str, Any]], reference: str) -> str:
    """Markdown table of the summary rows; ratios are relative to ``reference``."""
    header = (
        "| backbone | image AUROC | pixel AUROC | AUPRO | per-texture image AUROC/AUPRO | fit s/epoch "
        f"| torch ms/img (ratio vs {reference}) | encoder ms (ratio) |"
    )
    lines = [header, "|" + "---|" * 8]
    for row in rows:
        per_texture = ", ".join(
            f"{texture} {metrics['image_auroc']:.3f}/{metrics['aupro']:.3f}"
            for texture, metrics in row["per_texture"].items()
        )
        lines.append(
            f"| {row['backbone']} | {row['image_auroc']:.3f} | {row['pixel_auroc']:.3f} | {row['aupro']:.3f} "
            f"| {per_texture} | {row['fit_seconds_per_epoch']:.1f} "
            f"| {row['model_ms']:.1f} ({row['model_ratio_vs_first']:.2f}x) "
            f"| {row['encoder_ms']:.1f} ({row['encoder_ratio_vs_first']:.2f}x) |",
        )
    return "\n".join(lines)


def payload(config: BenchmarkConfig, runs: Sequence[RunResult], latency: Sequence[LatencyResult]) -> dict[str, Any]:
    """JSON document of the whole benchmark, partial results included."""
    return {
        "config": asdict(config),
        "environment": environment(),
        "summary": summarize(runs, latency) if runs else [],
        "runs": [{**asdict(run), "fit_seconds_per_epoch": run.fit_seconds_per_epoch} for run in runs],
        "latency": [asdict(entry) for entry in latency],
    }


def report(path: Path) -> str:
    """Recompute the summary of a JSON written by this script, store it there and return its table."""
    document = json.loads(path.read_text())
    run_keys = {item.name for item in fields(RunResult)}
    runs = [RunResult(**{key: value for key, value in run.items() if key in run_keys}) for run in document["runs"]]
    latency = [LatencyResult(**entry) for entry in document["latency"]]
    document["summary"] = summarize(runs, latency)
    write_json(path, document)
    return format_table(document["summary"], document["config"]["backbones"][0])


# --------------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the table and write the JSON. Return the exit code."""
    args = build_parser().parse_args(argv)
    if args.report is not None:
        print(report(args.report))
        return 0
    config = build_config(args)
    quiet_libraries()
    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    generate_demo_dataset(
        config.data_root,
        textures=config.textures,
        image_size=config.image_size,
        n_train=config.n_train,
        n_test_good=config.n_test_good,
        n_test_defect=config.n_test_defect,
    )
    print(f"data: {config.data_root} ({time.perf_counter() - started:.1f} s)", flush=True)

    runs: list[RunResult] = []
    trained: dict[str, CflowPlus] = {}
    for backbone in config.backbones:
        for texture in config.textures:
            result, trained[backbone] = train_and_test(backbone, texture, config)
            runs.append(result)
            print(
                f"{backbone} {texture}: {result.metrics} fit {result.fit_seconds:.1f} s "
                f"(epochs {[round(s, 1) for s in result.epoch_seconds]}) test {result.test_seconds:.1f} s "
                f"[{torch.get_num_threads()} threads]",
                flush=True,
            )
            write_json(config.json_path, payload(config, runs, []))

    latency = measure_latency(trained, config.image_size, config.latency_repeats, config.latency_warmup)
    for entry in latency:
        print(f"latency {entry.backbone}: model {entry.model_ms:.1f} ms, encoder {entry.encoder_ms:.1f} ms", flush=True)
    document = payload(config, runs, latency)
    document["total_seconds"] = time.perf_counter() - started
    write_json(config.json_path, document)

    print()
    print(format_table(document["summary"], config.backbones[0]))
    print(f"\nJSON: {config.json_path}\ntotal: {document['total_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
