"""Thresholds from good images only, against anomalib's F1 threshold, on a validation split without defects.

Per data set: CflowPlus is fitted with a validation split of good training images only
(``val_split_mode="from_train"``, 25%), as on a line where no defect has been collected. The thresholds are then
learned on that split by ``threshold="normal"`` (at several ``normal_fpr``) and by anomalib's own
``PostProcessor`` (F1-adaptive), and the labels are scored on the test split: image F1, the false-positive rate on
its good images and the recall on its defective ones. One fit per data set; each post-processor relearns its
thresholds with ``Engine.validate`` (a fresh engine each) on the same split.

Usage::

    python -m benchmarks.thresholds                                  # metal_plate, screw, demo textures
    python -m benchmarks.thresholds --datasets metal_plate demo/grass --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.post_processing import PostProcessor
from lightning.pytorch import seed_everything

from anomalib_cflow_plus import CflowPlus, CflowPlusPostProcessor
from benchmarks.harness import (
    DEFAULT_REALDEV_ROOT,
    OUT_DIR,
    cpu_engine,
    dataset_location,
    demo_datamodule,
    format_spread,
    mean_and_spread,
)

DATASETS = ("metal_plate", "screw", "demo/brick", "demo/grass", "demo/gravel")
RATES = (0.01, 0.05)


def label_figures(model: CflowPlus, engine: Engine, datamodule: MVTecAD) -> dict[str, float]:
    """Image F1, false-positive rate on good test images and recall on defective ones, from ``pred_label``."""
    batches = engine.predict(model, dataloaders=datamodule.test_dataloader())
    predicted = torch.cat([batch.pred_label.flatten() for batch in batches]).bool()
    truth = torch.cat([batch.gt_label.flatten() for batch in batches]).bool()
    true_positives = int((predicted & truth).sum())
    return {
        "f1": 2 * true_positives / max(int(predicted.sum()) + int(truth.sum()), 1),
        "fpr": float(predicted[~truth].float().mean()),
        "recall": float(predicted[truth].float().mean()),
    }


def run(dataset: str, seed: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Fit once, then the label figures of every post-processor on the same good-only validation split."""
    torch.set_num_threads(args.threads)
    seed_everything(seed)
    root, category = dataset_location(dataset, args.data_root)
    datamodule = demo_datamodule(
        root, category, num_workers=0, val_split_mode="from_train", val_split_ratio=0.25, seed=seed
    )
    model = CflowPlus(pre_processor=CflowPlus.configure_pre_processor((args.image_size, args.image_size)))
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as work:
        cpu_engine(Path(work), args.epochs).fit(model, datamodule=datamodule)
        post_processors: dict[str, PostProcessor] = {
            f"normal, normal_fpr={rate}": CflowPlusPostProcessor(threshold="normal", normal_fpr=rate) for rate in RATES
        }
        post_processors["anomalib F1 (default PostProcessor)"] = PostProcessor()
        for name, post_processor in post_processors.items():
            # A fresh engine per post-processor: Lightning keeps a trainer's callbacks of other types, so a reused
            # trainer would run the previous post-processor too.
            model.post_processor = post_processor
            engine = cpu_engine(Path(work), args.epochs)
            engine.validate(model, datamodule=datamodule, verbose=False)
            figures[name] = label_figures(model, engine, datamodule)
    figures["validation images"] = {"count": len(datamodule.val_data)}
    return figures


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_REALDEV_ROOT)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=OUT_DIR / "thresholds.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    results: list[dict[str, Any]] = []
    for dataset in args.datasets:
        for seed in args.seeds:
            figures = run(dataset, seed, args)
            results.append({"dataset": dataset, "seed": seed, "figures": figures})
            print(f"  {dataset}, seed {seed}: {figures}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))

    names = [name for name in results[0]["figures"] if name != "validation images"]
    lines = ["| thresholds | figure | " + " | ".join(args.datasets) + " |", "|" + "---|" * (2 + len(args.datasets))]
    for name in names:
        for figure in ("f1", "fpr", "recall"):
            cells = []
            for dataset in args.datasets:
                values = [r["figures"][name][figure] for r in results if r["dataset"] == dataset]
                cells.append(format_spread(mean_and_spread(values), 2))
            lines.append(f"| {name} | {figure} | " + " | ".join(cells) + " |")
    counts = [str(next(r for r in results if r["dataset"] == d)["figures"]["validation images"]["count"]) for d in
              args.datasets]  # fmt: skip
    lines.append("| good validation images | | " + " | ".join(counts) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
