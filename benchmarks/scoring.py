"""Compare CflowPlus's score modes on the demo data: ``paper`` (likelihood ratio) vs ``zscore`` (standardized).

Both modes read the same trained decoders and differ only in how per-layer log-likelihoods become the
anomaly map, so each texture trains once and is tested in both modes (validation reruns first, so the
post-processor's normalization and thresholds follow the mode). AUROC and AUPRO do not depend on those.
A third row scores the same decoders as the paper's code does (:func:`paper_code_metrics`): normalized by the
maximum over the whole test set, no smoothing, the map's maximum as the image score.

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

import torch
from anomalib.data import ImageBatch, MVTecAD
from anomalib.metrics import AUPRO, AUROC
from harness import DEFAULT_SEED, OUT_DIR, cpu_engine, demo_datamodule, extract_metrics
from lightning.pytorch import seed_everything
from recipes import parse_common_arguments, prepare_demo_data
from torch.nn import functional as F  # noqa: N812

from anomalib_cflow_plus import CflowPlus
from anomalib_cflow_plus.anomaly_map import SCORE_MODES


def evaluate_modes(texture: str, data_root: Path, backbone: str, epochs: int) -> dict[str, dict[str, float]]:
    """Train once on ``texture``, then validate and test in every score mode."""
    seed_everything(DEFAULT_SEED, workers=True)
    model = CflowPlus(backbone=backbone)
    datamodule = demo_datamodule(data_root, texture)
    engine = cpu_engine(OUT_DIR / "runs" / "scoring", epochs)
    engine.fit(model=model, datamodule=datamodule)
    results = {}
    for mode in SCORE_MODES:
        model.model.anomaly_map.score_mode = mode
        engine.validate(model=model, datamodule=datamodule, verbose=False)
        results[mode] = extract_metrics(engine.test(model=model, datamodule=datamodule, verbose=False))
        print(f"{texture} {mode}: {results[mode]}", flush=True)
    model.model.anomaly_map.score_mode = SCORE_MODES[0]
    results[PAPER_CODE] = paper_code_metrics(model, datamodule)
    print(f"{texture} {PAPER_CODE}: {results[PAPER_CODE]}", flush=True)
    return results


PAPER_CODE = "paper's code (test-set max)"


def paper_code_metrics(model: CflowPlus, datamodule: MVTecAD) -> dict[str, float]:
    """Image AUROC, pixel AUROC and AUPRO of the paper's own scoring, on the decoders of ``model``.

    Per layer ``exp(ll - max over the whole test set)``, upsampled (bilinear, corners aligned) and summed; the map
    is the test set's maximum of that sum minus it; the image score is the map's maximum. Every image's score thus
    depends on the whole test set, which a deployed model does not have.
    """
    model.eval()
    layer_maps: list[list[torch.Tensor]] = []
    masks, labels = [], []
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            images = model.pre_processor(batch.image)
            layer_maps.append(model.model.log_likelihood_maps(model.model.encode(images)))
            masks.append(batch.gt_mask)
            labels.append(batch.gt_label)
    size = tuple(images.shape[-2:])
    summed = torch.zeros(sum(len(label) for label in labels), 1, *size)
    for layer in range(len(layer_maps[0])):
        log_likelihoods = torch.cat([maps[layer] for maps in layer_maps])  # (N, h, w)
        probabilities = torch.exp(log_likelihoods - log_likelihoods.max())[:, None]
        summed += F.interpolate(probabilities, size=size, mode="bilinear", align_corners=True)
    anomaly_maps = summed.max() - summed
    gt_masks = F.interpolate(torch.cat(masks)[:, None].float(), size=size, mode="nearest").bool()
    batch = ImageBatch(
        image=torch.zeros(len(anomaly_maps), 3, *size),
        gt_label=torch.cat(labels),
        gt_mask=gt_masks[:, 0],
        anomaly_map=anomaly_maps,
        pred_score=anomaly_maps.flatten(1).amax(dim=1),
    )
    metrics = {
        "image_auroc": AUROC(fields=["pred_score", "gt_label"]),
        "pixel_auroc": AUROC(fields=["anomaly_map", "gt_mask"], strict=False),
        "aupro": AUPRO(fields=["anomaly_map", "gt_mask"], strict=False),
    }
    for metric in metrics.values():
        metric.update(batch)
    return {name: float(metric.compute()) for name, metric in metrics.items()}


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table: per score mode, each texture's image AUROC and the means over textures."""
    textures = list(results)
    header = " | ".join(f"{texture} image AUROC" for texture in textures)
    lines = [
        f"| score mode | {header} | mean image AUROC | mean pixel AUROC | mean AUPRO |",
        "|---|" + "---|" * (len(textures) + 3),
    ]
    for mode in (*SCORE_MODES, PAPER_CODE):
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
