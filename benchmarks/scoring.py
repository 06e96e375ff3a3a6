"""Compare CflowPlus's score modes on the demo data: ``paper`` (likelihood ratio) vs ``zscore`` (standardized).

Both modes read the same trained decoders and differ only in how per-layer log-likelihoods become the
anomaly map, so each texture trains once and is tested in both modes (validation reruns first, so the
post-processor's normalization and thresholds follow the mode). AUROC and AUPRO do not depend on those.

Usage::

    python benchmarks/scoring.py                       # 3 textures, lite1, 3 epochs
    python benchmarks/scoring.py --textures grass --epochs 1

Writes ``benchmarks/out/scoring.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from anomalib.data import MVTecAD
from anomalib.engine import Engine
from backbones import BATCH_SIZE, DEFAULT_SEED, NUM_WORKERS, OUT_DIR, extract_metrics
from lightning.pytorch import seed_everything
from recipes import parse_common_arguments, prepare_demo_data

from anomalib_cflow_plus import CflowPlus
from anomalib_cflow_plus.anomaly_map import SCORE_MODES


def evaluate_modes(texture: str, data_root: Path, backbone: str, epochs: int) -> dict[str, dict[str, float]]:
    """Train once on ``texture``, then validate and test in every score mode."""
    seed_everything(DEFAULT_SEED, workers=True)
    model = CflowPlus(backbone=backbone)
    datamodule = MVTecAD(
        root=data_root,
        category=texture,
        train_batch_size=BATCH_SIZE,
        eval_batch_size=BATCH_SIZE,
        num_workers=NUM_WORKERS,
    )
    engine = Engine(
        logger=False,
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        default_root_dir=OUT_DIR / "runs" / "scoring",
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    engine.fit(model=model, datamodule=datamodule)
    results = {}
    for mode in SCORE_MODES:
        model.model.anomaly_map.score_mode = mode
        engine.validate(model=model, datamodule=datamodule, verbose=False)
        results[mode] = extract_metrics(engine.test(model=model, datamodule=datamodule, verbose=False))
        print(f"{texture} {mode}: {results[mode]}", flush=True)
    return results


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table: per score mode, each texture's image AUROC and the means over textures."""
    textures = list(results)
    header = " | ".join(f"{texture} image AUROC" for texture in textures)
    lines = [
        f"| score mode | {header} | mean image AUROC | mean pixel AUROC | mean AUPRO |",
        "|---|" + "---|" * (len(textures) + 3),
    ]
    for mode in SCORE_MODES:
        per_texture = [results[texture][mode] for texture in textures]
        cells = " | ".join(f"{metrics['image_auroc']:.3f}" for metrics in per_texture)
        means = [
            statistics.fmean(metrics[key] for metrics in per_texture) for key in ("image_auroc", "pixel_auroc", "aupro")
        ]
        lines.append(f"| {mode} | {cells} | " + " | ".join(f"{value:.3f}" for value in means) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run both score modes on every texture; print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args = parse_common_arguments(parser, "scoring.json", argv)
    data_root = prepare_demo_data(args.textures)
    results = {texture: evaluate_modes(texture, data_root, args.backbone, args.epochs) for texture in args.textures}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"backbone": args.backbone, "epochs": args.epochs, "results": results}, indent=1))
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
