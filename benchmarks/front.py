"""The accuracy-latency front: what each coupling block, hidden unit, layer and pixel buys on real parts.

Every *setting* is CflowPlus with one or two arguments changed from its defaults (coupling blocks ``K``, the
subnets' ``hidden_ratio``, the layer set, the input size). Each is trained and tested on every real category of
``--data-root`` (``real_data_job``: anomalib's ``Engine``, 3 epochs, the packaged lite1 weights, one fresh
process per job, results cached by spec) for ``--seeds``, and timed in OpenVINO (its default precision and
``f32``, batch 1, untrained models: weights do not change latency) side by side with the peers built on
CflowPlus's encoder (``deploy_speed.py``'s "(lite1)" models), in one round-robin run.

Usage::

    python -m benchmarks.real_data --models Cflow Patchcore Fastflow Padim --datasets metal_plate screw tire
    python -m benchmarks.front                                   # train what is missing, time, report
    python -m benchmarks.front train --settings K4 --seeds 1 2   # more seeds for some settings
    python -m benchmarks.front time                              # only the latency
    python -m benchmarks.front report                            # table, the default's rule and the plot

The peers' accuracy comes from ``real_data.py``'s JSON (``--peers``), the same jobs on the same encoder. Writes
``benchmarks/out/front_accuracy.json`` (every training, merged over runs), ``front_latency.json``, ``front.json``
(the summary, the front and the default's rule) and ``benchmarks/figures/front.png``; prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    DEFAULT_REALDEV_ROOT,
    METRICS,
    OUT_DIR,
    cflow_plus_spec,
    format_spread,
    mean_and_spread,
    real_categories,
    real_data_job,
)
from benchmarks.jobs import REPO_ROOT

FIGURE = REPO_ROOT / "benchmarks" / "figures" / "front.png"
ACCURACY_JSON = OUT_DIR / "front_accuracy.json"
LATENCY_JSON = OUT_DIR / "front_latency.json"
REPORT_JSON = OUT_DIR / "front.json"
IMAGE_AUROC_MARGIN = 0.005  # the default is the fastest setting this close to the best mean image AUROC
CATEGORY_MARGIN = 0.01  # ... that loses no more than this on any category against today's default
# real_data.py's peer names -> the names in this study (the peers are built on lite1, as the settings are)
PEER_NAMES = {
    "Cflow": "Cflow (lite1)",
    "Patchcore": "PatchCore (lite1)",
    "Fastflow": "FastFlow (lite1)",
    "Padim": "PaDiM (lite1)",
}
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
    return cflow_plus_spec(kwargs, dataset, seed, args.data_root, image_size, args.epochs, args.threads)


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


def pareto(points: dict[str, tuple[float, float]]) -> list[str]:
    """The names on the front: no other point is both faster (lower x) and more accurate (higher y)."""
    return [
        name
        for name, (x, y) in points.items()
        if not any(ox <= x and oy >= y and (ox, oy) != (x, y) for other, (ox, oy) in points.items() if other != name)
    ]


def choose_default(accuracy: dict[str, Any], latency_ms: dict[str, float], datasets: Sequence[str]) -> dict[str, Any]:
    """The issue's rule, on ``datasets``: the fastest setting within ``IMAGE_AUROC_MARGIN`` of the best mean image
    AUROC whose every category is within ``CATEGORY_MARGIN`` of today's default's (today's default when none is);
    the verdicts, fastest first."""
    means = {
        name: statistics.fmean(entry["image_auroc"][dataset]["mean"] for dataset in datasets)
        for name, entry in accuracy.items()
        if all(dataset in entry["image_auroc"] for dataset in datasets)
    }
    best = max(means.values())
    reference = accuracy["default"]["image_auroc"]
    verdicts = []
    for name in sorted((n for n in means if n in latency_ms), key=latency_ms.get):
        reasons = []
        if means[name] < best - IMAGE_AUROC_MARGIN:
            reasons.append(f"mean {means[name]:.3f} < best {best:.3f} - {IMAGE_AUROC_MARGIN}")
        for dataset in datasets:
            drop = reference[dataset]["mean"] - accuracy[name]["image_auroc"][dataset]["mean"]
            if drop > CATEGORY_MARGIN:
                reasons.append(f"{dataset} -{drop:.3f}")
        verdicts.append({"setting": name, "ms": latency_ms[name], "mean": means[name], "fails": reasons})
    # Today's default never loses a category to itself; when no setting passes (the best one loses a category and
    # the default is not near it), nothing justifies a change, and the default stays.
    chosen = next((v["setting"] for v in verdicts if not v["fails"]), "default")
    return {"chosen": chosen, "none_passes": all(v["fails"] for v in verdicts), "best_mean": best, "verdicts": verdicts}


def leave_one_out(accuracy: dict[str, Any], latency_ms: dict[str, float], datasets: Sequence[str]) -> dict[str, Any]:
    """For each category: the rule's choice on the others, and the held-out category's image AUROC under it."""
    held_out = {}
    for dataset in datasets:
        chosen = choose_default(accuracy, latency_ms, [d for d in datasets if d != dataset])["chosen"]
        held_out[dataset] = {
            "chosen": chosen,
            "image_auroc": accuracy[chosen]["image_auroc"][dataset]["mean"],
            "default": accuracy["default"]["image_auroc"][dataset]["mean"],
        }
    return held_out


def plot(report: dict[str, Any], path: Path) -> None:
    """Mean image AUROC and AUPRO against OpenVINO latency: settings, their front, and the peers."""
    import matplotlib  # only the report needs it

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    latency = report["latency_ms"]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for axis, metric, label in zip(axes, ("image_auroc", "aupro"), ("mean image AUROC", "mean AUPRO"), strict=True):
        for group, marker, colour in (("settings", "o", "tab:blue"), ("peers", "s", "tab:red")):
            for name, entry in report[group].items():
                if name not in latency or "mean" not in entry[metric]:
                    continue
                value = entry[metric]["mean"]
                axis.errorbar(
                    latency[name], value["mean"], yerr=value.get("std", 0.0), fmt=marker, color=colour, capsize=3
                )
                axis.annotate(
                    name, (latency[name], value["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
        front = sorted(report["front"][metric], key=latency.get)
        axis.plot(
            [latency[n] for n in front],
            [report["settings"][n][metric]["mean"]["mean"] for n in front],
            "--",
            color="tab:blue",
            alpha=0.5,
        )
        axis.set_xlabel("OpenVINO default precision, batch 1, ms per image")
        axis.set_ylabel(f"{label} over {', '.join(report['datasets'])}")
        axis.grid(alpha=0.3)
    axes[0].set_title("CflowPlus settings (blue; dashed: the front) and peers on lite1 (red)", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def train(args: argparse.Namespace, datasets: Sequence[str]) -> list[dict[str, Any]]:
    """Every (seed, setting, category) job, trained or reused from the cache; their results."""
    results = []
    for seed in args.seeds:
        for setting in args.settings:
            for dataset in datasets:
                spec = accuracy_spec(setting, dataset, seed, args)
                results.append({"setting": setting, **real_data_job(spec, args.fresh)})
    return results


def time_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Export every setting (untrained) and the lite1 peers; time them side by side in OpenVINO, batch 1."""
    from benchmarks import deploy_speed  # torch's export machinery: only for timing

    by_size: dict[int, dict[str, Any]] = {}
    for setting in args.settings:
        kwargs, size = SETTINGS[setting]
        by_size.setdefault(size, {})[setting] = lambda size, kwargs=kwargs: deploy_speed.cflow_plus(size, **kwargs)
    by_size.setdefault(256, {}).update({name: deploy_speed.BUILDERS[name] for name in PEER_NAMES.values()})
    paths: dict[str, dict[str, str]] = {}
    for size, builders in by_size.items():
        exported, _ = deploy_speed.export_irs(builders, size, OUT_DIR / "front" / "ir", (1,), encoder=False)
        paths |= exported
    configs = [{"precision": "default", "batch": 1}, {"precision": "f32", "batch": 1}]
    return deploy_speed.time_irs(paths, configs, args, "front_time", reference="default")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs="?", default="all", choices=["all", "train", "time", "report"])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_REALDEV_ROOT)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument(
        "--peers",
        type=Path,
        default=OUT_DIR / "real_data.json",
        help="real_data.py's JSON with the peers' results on lite1",
    )
    args = parser.parse_args(argv)
    datasets = real_categories(args.data_root)
    if args.command in ("all", "train"):
        results = train(args, datasets)
        previous = json.loads(ACCURACY_JSON.read_text())["results"] if ACCURACY_JSON.is_file() else []
        keys = {(r["setting"], r["dataset"], r["seed"]) for r in results}
        results += [r for r in previous if (r["setting"], r["dataset"], r["seed"]) not in keys]
        ACCURACY_JSON.write_text(json.dumps({"datasets": datasets, "results": results}, indent=1))
        print(accuracy_table(summarize_accuracy(results, datasets), datasets))
    if args.command in ("all", "time"):
        LATENCY_JSON.write_text(json.dumps(time_settings(args), indent=1))
    if args.command in ("all", "report"):
        report(args, datasets)


def report(args: argparse.Namespace, datasets: Sequence[str]) -> None:
    """Combine accuracy, latency and the peers into the table, the default's choice and the plot."""
    results = [r for r in json.loads(ACCURACY_JSON.read_text())["results"] if "error" not in r]
    settings = summarize_accuracy(results, datasets)
    timing = json.loads(LATENCY_JSON.read_text())["results"]
    latency = {name: entry["ms_per_image"] for name, entry in timing[0]["summary"].items()}
    latency_f32 = {name: entry["ms_per_image"] for name, entry in timing[1]["summary"].items()}
    peers: dict[str, Any] = {}
    if args.peers.is_file():
        peer_runs = json.loads(args.peers.read_text())["results"]
        for peer, name in PEER_NAMES.items():
            runs = [dict(r, setting=name) for r in peer_runs if r["model"] == peer and r["dataset"] in datasets]
            runs = [r for r in runs if "error" not in r]
            if {r["dataset"] for r in runs} == set(datasets):
                peers |= summarize_accuracy(runs, datasets)
    points = {
        metric: {n: (latency[n], e[metric]["mean"]["mean"]) for n, e in settings.items() if n in latency}
        for metric in ("image_auroc", "aupro")
    }
    payload = {
        "datasets": datasets,
        "settings": settings,
        "peers": peers,
        "latency_ms": latency,
        "latency_f32_ms": latency_f32,
        "front": {metric: pareto(p) for metric, p in points.items()},
        "default_rule": choose_default(settings, latency, datasets),
        "leave_one_out": leave_one_out(settings, latency, datasets),
    }
    REPORT_JSON.write_text(json.dumps(payload, indent=1))
    plot(payload, FIGURE)
    print(accuracy_table({**settings, **peers}, datasets))
    print("\n| setting | OpenVINO default, batch 1, ms | (x default) | OpenVINO f32, ms | on the image-AUROC front |")
    print("|---|---|---|---|---|")
    for name in sorted(latency, key=latency.get):
        ratio = latency[name] / latency["default"]
        front = "yes" if name in payload["front"]["image_auroc"] else ""
        print(f"| {name} | {latency[name]:.1f} | {ratio:.2f} | {latency_f32[name]:.1f} | {front} |")
    rule = payload["default_rule"]
    print(f"\nthe rule picks: {rule['chosen']} (best mean image AUROC {rule['best_mean']:.3f})")
    for verdict in rule["verdicts"]:
        print(
            f"  {verdict['setting']}: {verdict['ms']:.1f} ms, mean {verdict['mean']:.3f}; "
            + ("; ".join(verdict["fails"]) or "passes")
        )
    for dataset, entry in payload["leave_one_out"].items():
        print(
            f"  chosen without {dataset}: {entry['chosen']}; {dataset} image AUROC {entry['image_auroc']:.3f} "
            f"(default {entry['default']:.3f})"
        )
    print(f"\nwrote {REPORT_JSON} and {FIGURE}")


if __name__ == "__main__":
    main()
