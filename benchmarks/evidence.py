"""The decoders' evidence: which local context, grid and image-score rule carry over to real parts (issue 28).

Each *candidate* changes what the decoders see or learn (a neighbourhood of fibers averaged before the flows, the
layer set, the input size, the training length) and is trained once per category and seed by ``real_data_job``
(anomalib's ``Engine``, the packaged lite1 weights, one fresh process per job, results cached by spec). Inside that
job, :mod:`benchmarks.evidence_scoring` scores the same decoders under every image-score rule and calibration
(the fused map's max, its top 3 % as MSFlow, each layer's max, today's mean of both, per-position calibration,
log-likelihoods pooled after the flows), so those are decided without retraining.

Usage::

    python -m benchmarks.evidence train --candidates default "neighbourhood 3" --seeds 0 1 2
    python -m benchmarks.evidence time --candidates default "neighbourhood 3"   # OpenVINO latency and IR size
    python -m benchmarks.evidence report            # tables, the default's rule, leave-one-out, the gate, figure

``report`` prints markdown, writes ``benchmarks/out/evidence.json`` and ``benchmarks/figures/evidence_maps_*.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anomalib_cflow_plus.calibration import PEAK_CONCENTRATION_THRESHOLD, PEAK_MIN_IMAGES
from benchmarks.harness import (
    DEFAULT_REALDEV_ROOT,
    DEMO_PREFIX,
    METRICS,
    OUT_DIR,
    REAL_DATA_JOBS,
    cflow_plus_spec,
    environment,
    format_spread,
    is_real,
    mean_and_spread,
    real_categories,
    real_data_job,
)
from benchmarks.jobs import REPO_ROOT

FIGURES = REPO_ROOT / "benchmarks" / "figures"
REPORT_JSON = OUT_DIR / "evidence.json"
TIMING_JSON = OUT_DIR / "evidence_time.json"
DEMO_DATASETS = tuple(f"{DEMO_PREFIX}{texture}" for texture in ("brick", "grass", "gravel"))
CATEGORY_MARGIN = 0.01  # a new default loses no more than this on any category, texture and metric
LITE1_LEVELS = {4: "blocks.1", 8: "blocks.2", 16: "blocks.4", 32: "blocks.6"}
BASELINE = ("default", "auto")  # what ships today: the combined score, position-calibrated where the gate fires

# name -> (CflowPlus arguments over its defaults, input size, epochs)
CANDIDATES: dict[str, tuple[dict[str, Any], int, int]] = {
    "default": ({}, 256, 3),
    "neighbourhood 3": ({"neighbourhood": 3}, 256, 3),
    "neighbourhood 5": ({"neighbourhood": 5}, 256, 3),
    "strides 8/16, neighbourhood 3": ({"layers": [LITE1_LEVELS[8], LITE1_LEVELS[16]], "neighbourhood": 3}, 256, 3),
    "strides 4/8/16/32": ({"layers": [LITE1_LEVELS[s] for s in (4, 8, 16, 32)]}, 256, 3),
    "384 px": ({}, 384, 3),
    "default, 1 epoch": ({}, 256, 1),
    "default, 8 epochs": ({}, 256, 8),
    "default, 20 epochs": ({}, 256, 20),
}


def job_spec(candidate: str, dataset: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The ``real_data_job`` spec of one candidate on one data set and seed."""
    kwargs, image_size, epochs = CANDIDATES[candidate]
    spec = cflow_plus_spec(kwargs, dataset, seed, args.data_root, image_size, epochs, args.threads)
    return {**spec, "evidence": True}


def train(args: argparse.Namespace) -> None:
    """Train every requested candidate, data set and seed that is not cached yet, one after another."""
    for seed in args.seeds:
        for candidate in args.candidates:
            for dataset in args.datasets:
                result = real_data_job(job_spec(candidate, dataset, seed, args))
                if "error" in result:
                    print(f"  FAILED: {candidate}, {dataset}, seed {seed}: {result.get('log')}", flush=True)


def time_candidates(args: argparse.Namespace) -> dict[str, Any]:
    """Export every candidate (untrained, calibrated: weights do not change latency) and time them side by side.

    OpenVINO at its default precision and in f32, batch 1 and 8, in one round-robin process
    (``deploy_speed.time_irs``); also each IR's size on disk.
    """
    from benchmarks import deploy_speed  # torch's export machinery: only for timing

    by_size: dict[int, dict[str, Any]] = {}
    for candidate in args.candidates:
        kwargs, size, _ = CANDIDATES[candidate]
        by_size.setdefault(size, {})[candidate] = lambda size, kwargs=kwargs: deploy_speed.cflow_plus(size, **kwargs)
    paths: dict[str, dict[str, str]] = {}
    for size, builders in by_size.items():
        exported, _ = deploy_speed.export_irs(builders, size, OUT_DIR / "evidence" / "ir", (1, 8), encoder=False)
        paths |= exported
    configs = [{"precision": p, "batch": b} for p in ("default", "f32") for b in (1, 8)]
    timing = deploy_speed.time_irs(paths, configs, args, "evidence_time", reference="default")
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.is_file() else ""
    timing["environment"] = environment() | {"amx": "amx_tile" in flags}
    timing["ir_mb"] = {
        name: Path(by_batch["1"]).with_suffix(".bin").stat().st_size / 2**20 for name, by_batch in paths.items()
    }
    return timing


def cached_results() -> list[dict[str, Any]]:
    """Every finished evidence job in the shared job cache, whatever the plugin's source was when it ran."""
    results = []
    for path in sorted(REAL_DATA_JOBS.glob("*.json")):
        if path.name.endswith(".spec.json"):
            continue
        result = json.loads(path.read_text())
        if result.get("evidence") and "variants" in result:
            results.append(result)
    return results


def candidate_of(result: dict[str, Any]) -> str | None:
    """The candidate whose arguments, size and epochs a job ran with."""
    for name, (kwargs, image_size, epochs) in CANDIDATES.items():
        if (result["model_kwargs"], result["image_size"], result["epochs"]) == (kwargs, image_size, epochs):
            return name
    return None


def gate_fires(variants: dict[str, Any], threshold: float = PEAK_CONCENTRATION_THRESHOLD) -> bool:
    """Whether ``image_calibration="auto"`` position-calibrates a training, from its recorded evidence."""
    return variants["train_images"] >= PEAK_MIN_IMAGES and min(variants["peak_concentration"]) >= threshold


def rows(results: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, dict[int, dict[str, float]]]]:
    """``(candidate, variant) -> dataset -> seed -> metrics``; ``"auto"`` is what the shipped gate would score."""
    table: dict[tuple[str, str], dict[str, dict[int, dict[str, float]]]] = {}
    for result in results:
        candidate = candidate_of(result)
        if candidate is None:
            continue
        variants = dict(result["variants"])
        variants["auto"] = variants["position combined" if gate_fires(variants) else "combined"]
        for variant, metrics in variants.items():
            if isinstance(metrics, dict) and "image_auroc" in metrics:
                table.setdefault((candidate, variant), {}).setdefault(result["dataset"], {})[result["seed"]] = metrics
    return table


def summarize(
    per_dataset: dict[str, dict[int, dict[str, float]]], datasets: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Per metric: each data set's mean and spread over seeds, and the real categories' mean per seed."""
    real = [dataset for dataset in datasets if is_real(dataset)]
    summary: dict[str, dict[str, Any]] = {}
    for metric in METRICS:
        entry: dict[str, Any] = {
            dataset: mean_and_spread(seeds[s][metric] for s in seeds)
            for dataset, seeds in per_dataset.items()
            if dataset in datasets
        }
        seeds = sorted(set.intersection(*(set(per_dataset.get(d, {})) for d in real))) if real else []
        if seeds:
            entry["real mean"] = mean_and_spread(
                statistics.fmean(per_dataset[d][s][metric] for d in real) for s in seeds
            )
            entry["real mean"]["seeds"] = seeds
        summary[metric] = entry
    return summary


def markdown(summaries: dict[tuple[str, str], dict[str, Any]], datasets: Sequence[str]) -> str:
    """One row per candidate and variant: image AUROC / pixel AUROC / AUPRO, real mean and per data set."""
    columns = ["real mean", *datasets]
    lines = ["| candidate | image score | seeds | " + " | ".join(columns) + " |", "|" + "---|" * (3 + len(columns))]
    for (candidate, variant), summary in summaries.items():
        seeds = summary["image_auroc"].get("real mean", {}).get("seeds", [])
        cells = [
            " / ".join(format_spread(summary[m][c]) for m in METRICS) if c in summary["image_auroc"] else ""
            for c in columns
        ]
        lines.append(f"| {candidate} | {variant} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compact_markdown(summaries: dict[tuple[str, str], dict[str, Any]], datasets: Sequence[str]) -> str:
    """One row per candidate and variant: the real mean's three metrics, then image AUROC / AUPRO per data set."""
    lines = [
        "| candidate | image score | seeds | real mean: image AUROC / pixel AUROC / AUPRO | "
        + " | ".join(datasets) + " |",
        "|" + "---|" * (4 + len(datasets)),
    ]  # fmt: skip
    for (candidate, variant), summary in summaries.items():
        mean = summary["image_auroc"].get("real mean")
        head = " / ".join(format_spread(summary[m]["real mean"]) for m in METRICS) if mean else ""
        cells = [
            f"{summary['image_auroc'][d]['mean']:.3f} / {summary['aupro'][d]['mean']:.3f}"
            if d in summary["image_auroc"] else ""
            for d in datasets
        ]  # fmt: skip
        seeds = len(mean["seeds"]) if mean else ""
        lines.append(f"| {candidate} | {variant} | {seeds} | {head} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost_markdown(results: list[dict[str, Any]], timing: dict[str, Any] | None, real: Sequence[str]) -> str:
    """Per candidate: training s per category, checkpoint MiB (mean over its real-category jobs), IR MiB, latency."""
    configs = [(r["precision"], r["batch"], r["summary"]) for r in (timing or {}).get("results", [])]
    columns = ["candidate", "train s per category (mean over seeds)", "checkpoint MiB", "IR MiB"]
    columns += [f"OpenVINO {precision} b{batch}, ms (x default)" for precision, batch, _ in configs]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for candidate in CANDIDATES:
        jobs = [r for r in results if candidate_of(r) == candidate and r["dataset"] in real]
        timed = timing is not None and candidate in timing.get("ir_mb", {})
        if not jobs and not timed:
            continue
        by_dataset: dict[str, list[float]] = {}
        for job in jobs:
            by_dataset.setdefault(job["dataset"], []).append(job["train_s"])
        train = ", ".join(f"{d} {statistics.fmean(by_dataset[d]):.0f}" for d in real if d in by_dataset)
        checkpoint = f"{statistics.fmean(r['checkpoint_mb'] for r in jobs):.1f}" if jobs else ""
        ir = f"{timing['ir_mb'][candidate]:.1f}" if timed else ""
        cells = [
            f"{summary[candidate]['ms_per_image']:.1f} ({summary[candidate]['vs_reference']:.2f})"
            if candidate in summary else ""
            for _, _, summary in configs
        ]  # fmt: skip
        lines.append("| " + " | ".join([candidate, train, checkpoint, ir, *cells]) + " |")
    return "\n".join(lines)


def passes_rule(
    candidate: dict[str, Any], baseline: dict[str, Any], datasets: Sequence[str], margin: float = CATEGORY_MARGIN
) -> dict[str, Any]:
    """The rule for a new default: higher real-mean image AUROC and AUPRO, no data set or metric ``margin`` worse.

    Data sets either side lacks are not judged; the figures are means over the seeds both have.
    """
    losses = {
        f"{dataset} {metric}": round(candidate[metric][dataset]["mean"] - baseline[metric][dataset]["mean"], 4)
        for dataset in datasets
        for metric in METRICS
        if dataset in candidate[metric] and dataset in baseline[metric]
        and candidate[metric][dataset]["mean"] < baseline[metric][dataset]["mean"] - margin
    }  # fmt: skip
    gains = {
        metric: candidate[metric]["real mean"]["mean"] - baseline[metric]["real mean"]["mean"]
        for metric in ("image_auroc", "aupro")
        if "real mean" in candidate[metric] and "real mean" in baseline[metric]
    }
    passed = len(gains) == 2 and all(gain > 0 for gain in gains.values()) and not losses
    return {"passed": passed, "gains": gains, "losses": losses}


def leave_one_out_choice(
    summaries: dict[tuple[str, str], dict[str, Any]], real: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """For each held-out real category: the best (candidate, variant) by mean image AUROC + AUPRO on the others.

    Only pairs measured on every real category are ranked; the held-out category's figures of the choice and of the
    baseline are reported beside it.
    """
    complete = {key: s for key, s in summaries.items() if all(d in s["image_auroc"] for d in real)}
    choices = {}
    for held_out in real:
        others = [d for d in real if d != held_out]

        def merit(key: tuple[str, str], others: Sequence[str] = others) -> float:
            summary = complete[key]
            return statistics.fmean(summary["image_auroc"][d]["mean"] + summary["aupro"][d]["mean"] for d in others)

        best = max(complete, key=merit)
        choices[held_out] = {
            "choice": " / ".join(best),
            "held_out": {m: complete[best][m][held_out]["mean"] for m in METRICS},
            "baseline": {m: complete[BASELINE][m][held_out]["mean"] for m in METRICS} if BASELINE in complete else None,
        }
    return choices


GATE_RULES = ("midpoint", "lowest gainer", "fixed")


def gate_threshold(table: dict[str, dict[str, Any]], rule: str) -> float | None:
    """A threshold from some categories' trainings, or ``None`` (never fire) when no rule can separate them.

    A category *gains* when position calibration lifts its mean image AUROC by more than ``CATEGORY_MARGIN``.
    ``"midpoint"``: halfway between the lowest concentration of a gaining training and the highest of any other;
    ``"lowest gainer"``: the lowest concentration of a gaining training (as high as it can be while every gaining
    training seen still fires); ``"fixed"``: the shipped constant, fitted to nothing ("most good images").
    """
    if rule == "fixed":
        return PEAK_CONCENTRATION_THRESHOLD
    gaining = [c for e in table.values() if e["gain"] > CATEGORY_MARGIN for c in e["concentration"]]
    others = [c for e in table.values() if e["gain"] <= CATEGORY_MARGIN for c in e["concentration"]]
    if not gaining or (others and min(gaining) <= max(others)):
        return None
    if rule == "midpoint" and others:
        return (min(gaining) + max(others)) / 2
    return min(gaining)


def gate_study(results: list[dict[str, Any]], datasets: Sequence[str], candidate: str) -> dict[str, Any]:
    """The ``auto`` gate re-decided: each data set's peak concentrations and what position calibration changes.

    For each held-out data set and rule, the threshold is chosen on the others (:func:`gate_threshold`); the
    held-out trainings on which it fires, and the image AUROC that changes, are reported. ``chosen`` is each rule's
    threshold on every data set.
    """
    table: dict[str, dict[str, Any]] = {}
    for result in results:
        if candidate_of(result) != candidate or result["dataset"] not in datasets:
            continue
        variants = result["variants"]
        entry = table.setdefault(result["dataset"], {"concentration": [], "gains": [], "train_images": 0})
        entry["concentration"].append(min(variants["peak_concentration"]))
        entry["gains"].append(variants["position combined"]["image_auroc"] - variants["combined"]["image_auroc"])
        entry["train_images"] = variants["train_images"]
    for entry in table.values():
        entry["gain"] = statistics.fmean(entry["gains"])
    held_out_results: dict[str, dict[str, Any]] = {}
    for held_out, entry in table.items():
        others = {d: e for d, e in table.items() if d != held_out}
        for rule in GATE_RULES:
            threshold = gate_threshold(others, rule)
            fires = [threshold is not None and c >= threshold for c in entry["concentration"]]
            change = statistics.fmean(g if f else 0.0 for g, f in zip(entry["gains"], fires, strict=True))
            held_out_results.setdefault(held_out, {})[rule] = {
                "threshold": threshold, "fires": f"{sum(fires)}/{len(fires)}", "image_auroc_change": change,
            }  # fmt: skip
    chosen = {rule: gate_threshold(table, rule) for rule in GATE_RULES}
    return {"per_dataset": table, "leave_one_out": held_out_results, "chosen": chosen}


def plot_maps(results: list[dict[str, Any]], before: str, after: str, path: Path) -> None:
    """Test images (2 good, 3 defective) of each real category, seed 0: image, mask, map before and after.

    Each map row shares one colour scale over its five images.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def maps_of(candidate: str, dataset: str) -> dict[str, np.ndarray] | None:
        for result in results:
            if candidate_of(result) == candidate and result["dataset"] == dataset and result["seed"] == 0:
                figure = Path(result["variants"].get("figure_maps", ""))
                return dict(np.load(figure)) if figure.is_file() else None
        return None

    datasets = sorted({r["dataset"] for r in results if is_real(r["dataset"])})
    panels = [(d, maps_of(before, d), maps_of(after, d)) for d in datasets]
    panels = [(d, b, a) for d, b, a in panels if b is not None and a is not None]
    if not panels:
        return
    count = len(panels[0][1]["labels"])
    fig, axes = plt.subplots(4 * len(panels), count, figsize=(2.0 * count, 8.0 * len(panels)), squeeze=False)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for block, (dataset, old, new) in enumerate(panels):
        for column in range(count):
            image = np.clip(old["images"][column].astype(np.float32).transpose(1, 2, 0) * std + mean, 0, 1)
            label = "defective" if old["labels"][column] else "good"
            cells = [(image, f"{dataset} {label}"), (old["masks"][column], "mask")]
            cells += [(old["maps"][column].astype(np.float32), before), (new["maps"][column].astype(np.float32), after)]
            for row, (picture, title) in enumerate(cells):
                axis = axes[4 * block + row, column]
                scale = {}  # one colour scale per category and model, so that good and defective images compare
                if row >= 2:
                    maps = (old if row == 2 else new)["maps"].astype(np.float32)
                    scale = {"vmin": float(maps.min()), "vmax": float(maps.max())}
                axis.imshow(picture, cmap=None if picture.ndim == 3 else "inferno", **scale)
                axis.set_title(title, fontsize=7)
                axis.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=56)
    plt.close(fig)


def report(args: argparse.Namespace) -> None:
    """Tables of every candidate and variant, the default's rule, leave-one-out choices, the gate and the figure."""
    results = cached_results()
    datasets = [d for d in args.datasets if any(r["dataset"] == d for r in results)]
    real = [d for d in datasets if is_real(d)]
    summaries = {key: summarize(per_dataset, datasets) for key, per_dataset in sorted(rows(results).items())}
    print(markdown(summaries, datasets))
    print("\n" + compact_markdown(summaries, datasets))
    verdicts = {}
    if BASELINE in summaries:
        for key, summary in summaries.items():
            if key != BASELINE:
                verdicts[" / ".join(key)] = passes_rule(summary, summaries[BASELINE], datasets)
        print("\n| candidate / image score | passes | real-mean gains (image AUROC, AUPRO) | losses > 0.01 |")
        print("|---|---|---|---|")
        for name, verdict in verdicts.items():
            gains = ", ".join(f"{v:+.3f}" for v in verdict["gains"].values())
            print(f"| {name} | {verdict['passed']} | {gains} | {verdict['losses'] or ''} |")
    loo = leave_one_out_choice(summaries, real)
    print("\n| held out | chosen on the others | held out: image AUROC / pixel AUROC / AUPRO | today's default |")
    print("|---|---|---|---|")
    for held_out, entry in loo.items():
        base = entry["baseline"] or {}
        print(
            f"| {held_out} | {entry['choice']} | " + " / ".join(f"{entry['held_out'][m]:.3f}" for m in METRICS)
            + " | " + " / ".join(f"{base[m]:.3f}" for m in METRICS if m in base) + " |"
        )  # fmt: skip
    gate = gate_study(results, datasets, args.gate_candidate)
    print("\n| data set | train images | peak concentration per seed | position - layer image AUROC |")
    print("|---|---|---|---|")
    for dataset, entry in gate["per_dataset"].items():
        concentrations = " / ".join(f"{c:.2f}" for c in entry["concentration"])
        print(f"| {dataset} | {entry['train_images']} | {concentrations} | {entry['gain']:+.3f} |")
    print("\n| held out | " + " | ".join(f"{rule}: threshold, fires, image AUROC change" for rule in GATE_RULES) + " |")
    print("|---|" + "---|" * len(GATE_RULES))
    for held_out, by_rule in gate["leave_one_out"].items():
        cells = []
        for rule in GATE_RULES:
            entry = by_rule[rule]
            threshold = "never" if entry["threshold"] is None else f"{entry['threshold']:.3f}"
            cells.append(f"{threshold}, {entry['fires']}, {entry['image_auroc_change']:+.3f}")
        print(f"| {held_out} | " + " | ".join(cells) + " |")
    print("chosen on every data set:", gate["chosen"])
    timing = json.loads(TIMING_JSON.read_text()) if TIMING_JSON.is_file() else None
    print("\n" + cost_markdown(results, timing, real))
    if timing is not None:
        machine = timing.get("environment", {})
        print(f"timed on: {machine.get('cpu', 'this CPU')}, AMX: {machine.get('amx')}")
    from benchmarks.deploy_speed import slug

    figures = [FIGURES / f"evidence_maps_{slug(after)}.png" for after in args.after]
    for after, figure in zip(args.after, figures, strict=True):
        plot_maps(results, "default", after, figure)
    payload = {
        "datasets": datasets,
        "summaries": {" / ".join(key): summary for key, summary in summaries.items()},
        "rule": verdicts,
        "leave_one_out": loo,
        "gate": gate,
        "timing": timing,
    }
    REPORT_JSON.parent.mkdir(parents=True, exist_ok=True)
    REPORT_JSON.write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {REPORT_JSON} and {', '.join(map(str, figures))}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("train", "time", "report"))
    parser.add_argument("--data-root", type=Path, default=DEFAULT_REALDEV_ROOT)
    parser.add_argument("--candidates", nargs="+", default=["default", "neighbourhood 3"], choices=list(CANDIDATES))
    parser.add_argument("--datasets", nargs="+", default=None, help="default: every real category and demo texture")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15, help="timing rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    drawn = ["neighbourhood 3", "strides 4/8/16/32"]
    parser.add_argument("--after", nargs="+", default=drawn, help="candidates drawn beside the default")
    parser.add_argument("--gate-candidate", default="default", help="whose trainings decide the auto gate")
    args = parser.parse_args(argv)
    if not args.data_root.is_dir():
        parser.error(
            f"--data-root {args.data_root} does not exist: point it at a folder of categories in MVTec AD layout "
            "(<category>/train/good, <category>/test/<type>, <category>/ground_truth/<type>)."
        )
    args.datasets = args.datasets or [*real_categories(args.data_root), *DEMO_DATASETS]
    if args.action == "train":
        train(args)
    elif args.action == "time":
        TIMING_JSON.parent.mkdir(parents=True, exist_ok=True)
        TIMING_JSON.write_text(json.dumps(time_candidates(args), indent=1))
        print(f"wrote {TIMING_JSON}")
    else:
        report(args)


if __name__ == "__main__":
    main()
