"""Post-hoc scoring of one trained CflowPlus: every image-score rule and calibration from one pass over the data.

Run inside a ``real_data_job`` whose spec asks for it (``"evidence": true``). The decoders are trained once; what
does not change them (the image-score rule, one constant per layer or per position, pooling the log-likelihoods
after the flows) is decided here from the per-layer log-likelihood maps of every training and test image:

- each *variant* is an :class:`~anomalib_cflow_plus.anomaly_map.AnomalyMapGenerator` configuration, calibrated on
  the training images' maps exactly as :func:`~anomalib_cflow_plus.calibration.calibrate` would;
- its image AUROC, pixel AUROC and AUPRO are computed on the test maps at the pre-processed size;
- the ``auto`` gate's evidence (each layer's peak concentration) is recorded, so that its threshold can be chosen
  leaving a category out without retraining;
- a few test images' maps are saved for the study's figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalib_cflow_plus.anomaly_map import AnomalyMapGenerator
from anomalib_cflow_plus.calibration import LayerStatistics
from anomalib_cflow_plus.torch_model import local_mean
from benchmarks.harness import aupro, image_auroc, pixel_auroc

# name -> (image_score, top_k_percent, calibration, post-flow pooling side)
VARIANTS: dict[str, tuple[str, float, str, int]] = {
    "combined": ("combined", 0.0, "layer", 1),  # today's rule
    "map max": ("map", 0.0, "layer", 1),
    "map top 3%": ("map", 3.0, "layer", 1),  # MSFlow's image score: the mean of the fused map's top 3 %
    "layer_max": ("layer_max", 0.0, "layer", 1),
    "position combined": ("combined", 0.0, "position", 1),  # what the auto gate switches to
    "pooled 3 combined": ("combined", 0.0, "layer", 3),  # log-likelihoods averaged over 3x3 after the flows
}
FIGURE_GOOD, FIGURE_DEFECTIVE = 2, 3


def pool(maps: list[torch.Tensor], side: int) -> list[torch.Tensor]:
    """Average each layer's log-likelihood map ``(B, h, w)`` over ``side x side`` positions (1: unchanged)."""
    return [local_mean(layer_map.unsqueeze(1), side).squeeze(1) for layer_map in maps]


def statistics_of(batches: list[list[torch.Tensor]]) -> LayerStatistics:
    """The calibration statistics of the training images' maps (a list of batches of L maps)."""
    statistics = LayerStatistics(len(batches[0]))
    for maps in batches:
        statistics.update(maps)
    return statistics


@torch.no_grad()
def collect(model: Any, dataloader: Any) -> tuple[list[list[torch.Tensor]], ...]:
    """Per batch, the L log-likelihood maps, the labels and the masks at the pre-processed size (and the images)."""
    torch_model, transform = model.model.eval(), model.pre_processor.transform
    maps, labels, masks, images = [], [], [], []
    for batch in dataloader:
        mask = batch.gt_mask if batch.gt_mask is not None else torch.zeros(len(batch.image), *batch.image.shape[-2:])
        image, mask = transform(batch.image, mask)
        maps.append([layer_map.cpu() for layer_map in torch_model.image_log_likelihood_maps(image)])
        labels.append(torch.as_tensor(batch.gt_label).long().cpu())
        masks.append(torch.as_tensor(mask).reshape(len(image), *image.shape[-2:]).cpu())
        images.append(image.cpu())
    return maps, labels, masks, images


def score_variants(model: Any, datamodule: Any, figure_path: Path | None = None) -> dict[str, Any]:
    """Every variant's metrics on the test split, the gate's evidence, and (optionally) a few maps for a figure."""
    train_maps, _, _, _ = collect(model, datamodule.train_dataloader())
    test_maps, labels, masks, images = collect(model, datamodule.test_dataloader())
    labels_np, masks_np = torch.cat(labels).numpy(), (torch.cat(masks) > 0).numpy()
    size = tuple(masks_np.shape[-2:])
    layers = len(train_maps[0])
    raw = statistics_of(train_maps)
    result: dict[str, Any] = {"peak_concentration": raw.peak_concentration(), "train_images": int(raw.count[0])}
    pixel_cache: dict[tuple[str, int], tuple[float, float]] = {}
    figure_maps: np.ndarray | None = None
    for name, (rule, top_k, calibration, side) in VARIANTS.items():
        statistics = raw if side == 1 else statistics_of([pool(maps, side) for maps in train_maps])
        generator = AnomalyMapGenerator(layers, model.model.anomaly_map.sigma, top_k, "paper", rule)
        generator.set_calibration(*statistics.finalize(calibration))
        scores, anomaly_maps = [], []
        for maps in test_maps:
            anomaly_map, score = generator(pool(maps, side), image_size=size)
            scores.append(score)
            anomaly_maps.append(anomaly_map[:, 0])
        all_maps = torch.cat(anomaly_maps).numpy()
        key = ("layer" if calibration == "position" else calibration, side)  # position scoring keeps the layer map
        if key not in pixel_cache:
            pixel_cache[key] = (pixel_auroc(all_maps, masks_np), aupro(all_maps, masks_np))
        result[name] = {
            "image_auroc": image_auroc(torch.cat(scores).numpy(), labels_np),
            "pixel_auroc": pixel_cache[key][0],
            "aupro": pixel_cache[key][1],
        }
        if name == "combined":
            figure_maps = all_maps
    if figure_path is not None:  # every image's per-layer log-likelihoods, for scoring rules tried later
        layer_maps = {
            f"{split}_{layer}": torch.cat([maps[layer] for maps in batches]).numpy()
            for split, batches in (("train", train_maps), ("test", test_maps))
            for layer in range(layers)
        }
        np.savez_compressed(figure_path.with_suffix(".llmaps.npz"), labels=labels_np, masks=masks_np, **layer_maps)
    if figure_path is not None and figure_maps is not None:
        good, defective = np.flatnonzero(labels_np == 0), np.flatnonzero(labels_np == 1)
        picked = np.concatenate(
            [good[np.linspace(0, len(good) - 1, FIGURE_GOOD).round().astype(int)],
             defective[np.linspace(0, len(defective) - 1, FIGURE_DEFECTIVE).round().astype(int)]]
        )  # fmt: skip
        np.savez_compressed(
            figure_path,
            images=torch.cat(images).numpy()[picked].astype(np.float16),
            masks=masks_np[picked],
            maps=figure_maps[picked].astype(np.float16),
            labels=labels_np[picked],
        )
        result["figure_maps"] = str(figure_path)
    return result
