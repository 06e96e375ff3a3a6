"""Input-size and tiling study: CflowPlus at 256 px, at 512 px, and at 512 px in 256-px tiles (two conditions).

Answers two questions on real photographs (``--data-root``, 512-px originals) and the demo textures drawn at
512 px (``demo512/<texture>``):

* Does the native 512-px input pay for small defects (issue: study 3, 256 against 512)?
* With anomalib's tiler, should a tile's fibers be conditioned on their position in the whole image
  (``tile_condition="image"``: the tiles' features are stitched first) or within the tile (``"tile"``)?

Every run is one job of ``real_data_job.py`` in a fresh process, cached with ``real_data.py``'s. Usage::

    python -m benchmarks.input_size                                   # every setting, data set and seed 0
    python -m benchmarks.input_size --datasets metal_plate --seeds 0 1 2
    python -m benchmarks.input_size --settings 256 512 --datasets screw
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomalib_cflow_plus.data import DEMO_TEXTURES
from benchmarks.harness import (
    DEFAULT_REALDEV_ROOT,
    DEMO_512_PREFIX,
    METRICS,
    OUT_DIR,
    cflow_plus_source,
    format_spread,
    mean_and_spread,
    real_data_job,
)

# name -> (input size, [tile size, stride] or None, tile_condition); "512-tiles-*": 512 px in four 256-px tiles
SETTINGS: dict[str, tuple[int, list[int] | None, str]] = {
    "256": (256, None, "image"),
    "512": (512, None, "image"),
    "512-tiles-image": (512, [256, 256], "image"),
    "512-tiles-tile": (512, [256, 256], "tile"),
}
DATASETS = ("metal_plate", "screw", *(f"{DEMO_512_PREFIX}{texture}" for texture in DEMO_TEXTURES))
COSTS = ("train_s", "test_ms_per_image", "peak_rss_mb")


def job_spec(setting: str, dataset: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The ``real_data_job`` spec of one setting, data set and seed."""
    size, tile, condition = SETTINGS[setting]
    spec: dict[str, Any] = {
        "model": "CflowPlus",
        "dataset": dataset,
        "data_root": str(args.data_root.resolve()),
        "seed": seed,
        "backbone": args.backbone,
        "image_size": size,
        "epochs": args.epochs,
        "threads": args.threads,
        "source": cflow_plus_source(),
    }
    if tile is not None:
        spec |= {"tile": tile, "model_kwargs": {"tile_condition": condition}}
    return spec


def table(results: dict[str, list[dict[str, Any]]], datasets: Sequence[str]) -> str:
    """One row per setting and figure: the mean (and spread over seeds) per data set, and over all data sets."""
    lines = [
        "| setting | figure | mean | " + " | ".join(datasets) + " |",
        "|" + "---|" * (3 + len(datasets)),
    ]
    for setting, runs in results.items():
        for figure in (*METRICS, *COSTS):
            values = [[r[figure] for r in runs if r["dataset"] == dataset] for dataset in datasets]
            per_dataset = [mean_and_spread(figures) if figures else None for figures in values]
            digits = 3 if figure in METRICS else 0
            done = [entry for entry in per_dataset if entry]
            mean = statistics.fmean(entry["mean"] for entry in done) if len(done) == len(datasets) else None
            cells = [format_spread(entry, digits) if entry else "" for entry in per_dataset]
            mean_cell = f"{mean:.{digits}f}" if mean is not None else ""
            lines.append(f"| {setting} | {figure} | {mean_cell} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_REALDEV_ROOT)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--backbone", default="efficientnet_lite1")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--json", type=Path, default=OUT_DIR / "input_size.json")
    args = parser.parse_args(argv)

    results: dict[str, list[dict[str, Any]]] = {}
    for setting in args.settings:
        for dataset in args.datasets:
            for seed in args.seeds:
                result = real_data_job(job_spec(setting, dataset, seed, args), args.fresh)
                if "error" not in result:
                    results.setdefault(setting, []).append(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {"settings": vars(args) | {"data_root": str(args.data_root)}, "results": results}, indent=2, default=str
        )
    )
    print(table(results, args.datasets))


if __name__ == "__main__":
    main()
