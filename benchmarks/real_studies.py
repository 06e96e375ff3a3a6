"""Studies that set CflowPlus's defaults on real images: scoring, calibration, layers, size, epochs, recipe.

Each *training* trains one CflowPlus configuration on one data set with one seed, and after every epoch
writes the per-layer log-likelihood maps of every training and every test image (``llmaps_e<E>.npz``).
Everything that does not change the decoders is then decided *post hoc* on those maps, without
retraining: how layers are calibrated (one constant per layer, or per position), which layers are
summed, how the image score is taken from the map, and the accuracy after each epoch. The decoders of
different layers are trained independently (their losses are summed, Adam is per parameter), so a
layer subset of a model with more layers is a fair stand-in for a model trained on that subset, up to
the number of steps the fast recipe makes (set by the layer with the most fibers).

Usage::

    python -m benchmarks.real_studies train --configs default levels4 --seeds 0 1 2 --epochs 3
    python -m benchmarks.real_studies analyze --configs default levels4 --seeds 0 1 2

Trainings are cached under ``benchmarks/out/real_studies/<config>/<dataset>/seed<S>/`` and skipped
when their maps exist; ``--fresh`` retrains. ``analyze`` prints markdown tables and writes
``benchmarks/out/real_studies.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anomalib.data import MVTecAD
from anomalib.models.components import AnomalibModule
from anomalib.models.components.filters.blur import compute_kernel_size
from kornia.filters import GaussianBlur2d
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch.nn import functional as F  # noqa: N812
from torch.utils.data import DataLoader

from anomalib_cflow_plus import CflowPlus
from anomalib_cflow_plus.data.demo import DEFECT_TYPES, apply_defect
from benchmarks.harness import (
    DEFAULT_REALDEV_ROOT,
    DEMO_PREFIX,
    OUT_DIR,
    aupro,
    cpu_engine,
    dataset_location,
    demo_datamodule,
    format_spread,
    image_auroc,
    is_real,
    mean_and_spread,
    pixel_auroc,
    real_categories,
)

STUDY_DIR = OUT_DIR / "real_studies"
MAX_CALIBRATION_IMAGES = 100
DEMO_DATASETS = tuple(f"{DEMO_PREFIX}{texture}" for texture in ("brick", "grass", "gravel"))

# Training configurations: CflowPlus arguments (over its defaults) and the input size.
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {"kwargs": {}, "image_size": 256},
    # lite1's four levels at strides 4/8/16/32: every three-level subset is analysed from this one training.
    "levels4": {"kwargs": {"layers": ["blocks.1", "blocks.2", "blocks.4", "blocks.6"]}, "image_size": 256},
    "lite0": {"kwargs": {"backbone": "efficientnet_lite0"}, "image_size": 256},
    "lite2": {"kwargs": {"backbone": "efficientnet_lite2"}, "image_size": 256},
    "paper": {"kwargs": {"training_recipe": "paper"}, "image_size": 256},
    "size512": {"kwargs": {}, "image_size": 512},
    "levels4_512": {"kwargs": {"layers": ["blocks.1", "blocks.2", "blocks.4", "blocks.6"]}, "image_size": 512},
}


# ---------------------------------------------------------------------------------------------- training


def _loader(dataset: Any, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=dataset.collate_fn)


class LogLikelihoodDump(Callback):
    """After every training epoch, write every train and test image's per-layer log-likelihood maps."""

    def __init__(self, datamodule: MVTecAD, out_dir: Path, every_epoch: bool, batch_size: int = 16) -> None:
        self.datamodule = datamodule
        self.out_dir = out_dir
        self.every_epoch = every_epoch
        self.batch_size = batch_size
        self.epoch_start = 0.0
        self.train_seconds: list[float] = []

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        self.epoch_start = time.perf_counter()

    @torch.no_grad()
    def maps(self, pl_module: CflowPlus, dataset: Any, synthetic: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per-layer log-likelihood maps ``(N, h_l, w_l)`` and features ``(N, h_l, w_l, C_l)`` (float16).

        With ``synthetic``, image ``i`` first gets one defect of :data:`DEFECT_TYPES` (drawn from seed ``i``).
        """
        model = pl_module.model
        was_training = model.training
        model.eval()
        per_layer: list[list[np.ndarray]] = []
        per_layer_features: list[list[np.ndarray]] = []
        index = 0
        for batch in _loader(dataset, self.batch_size):
            images = batch.image
            if synthetic:
                images = torch.stack([synthetic_defect(image, index + offset) for offset, image in enumerate(images)])
            index += len(images)
            features = model.encode(pl_module.pre_processor.transform(images))
            maps = model.log_likelihood_maps(features)
            if not per_layer:
                per_layer = [[] for _ in maps]
                per_layer_features = [[] for _ in maps]
            for layer, values in enumerate(maps):
                per_layer[layer].append(values.float().numpy())
                per_layer_features[layer].append(features[layer].permute(0, 2, 3, 1).half().numpy())
        model.train(was_training)
        return [np.concatenate(v) for v in per_layer], [np.concatenate(v) for v in per_layer_features]

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.train_seconds.append(time.perf_counter() - self.epoch_start)
        if not self.every_epoch and trainer.current_epoch + 1 < trainer.max_epochs:
            return
        train_data = self.datamodule.train_data
        if len(train_data) > MAX_CALIBRATION_IMAGES:  # evenly spaced training images suffice for the statistics
            picked = np.linspace(0, len(train_data) - 1, MAX_CALIBRATION_IMAGES).round().astype(int).tolist()
            train_data = torch.utils.data.Subset(train_data, picked)
            train_data.collate_fn = self.datamodule.train_data.collate_fn
        arrays: dict[str, np.ndarray] = {}
        for split, dataset in (("train", train_data), ("test", self.datamodule.test_data)):
            maps, features = self.maps(pl_module, dataset, synthetic=False)
            for layer, values in enumerate(maps):
                arrays[f"{split}_{layer}"] = values
            for layer, values in enumerate(features):
                arrays[f"{split}feat_{layer}"] = values
        # The same training images, each with one synthetic defect of the demo generator's: for choosing a
        # normalization from good images alone (a pseudo-AUROC of good against synthetic-defect images).
        for layer, values in enumerate(self.maps(pl_module, train_data, synthetic=True)[0]):
            arrays[f"synth_{layer}"] = values
        np.savez(self.out_dir / f"llmaps_e{trainer.current_epoch + 1}.npz", **arrays)


def synthetic_defect(image: torch.Tensor, index: int) -> torch.Tensor:
    """One of the demo generator's defects painted onto an image ``(3, H, W)`` in [0, 1], drawn from ``index``."""
    clean = (image.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    if clean.shape[-1] == 1:
        clean = np.repeat(clean, 3, axis=-1)
    rng = np.random.default_rng(index)
    defective, _ = apply_defect(np.ascontiguousarray(clean), DEFECT_TYPES[index % len(DEFECT_TYPES)], rng)
    return torch.from_numpy(defective).permute(2, 0, 1).float().div(255)[: image.shape[0]]


def save_ground_truth(datamodule: MVTecAD, out_dir: Path, image_size: int) -> None:
    """Labels ``(N,)`` and masks ``(N, S, S)`` (nearest-resized to the input size) of the test split."""
    labels, masks = [], []
    for batch in _loader(datamodule.test_data, 16):
        labels.append(batch.gt_label.numpy())
        mask = batch.gt_mask.float().unsqueeze(1)
        masks.append(F.interpolate(mask, size=(image_size, image_size), mode="nearest")[:, 0].bool().numpy())
    np.savez_compressed(out_dir / "ground_truth.npz", labels=np.concatenate(labels), masks=np.concatenate(masks))


def train(
    config_name: str, dataset_name: str, seed: int, epochs: int, data_root: Path, fresh: bool, every_epoch: bool
) -> Path:
    """Train one configuration on one data set with one seed, dumping log-likelihood maps after each epoch."""
    config = CONFIGS[config_name]
    out_dir = STUDY_DIR / f"{config_name}_e{epochs}" / dataset_name.replace("/", "_") / f"seed{seed}"
    if not fresh and (out_dir / f"llmaps_e{epochs}.npz").exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    root, category = dataset_location(dataset_name, data_root)
    seed_everything(seed, workers=True)
    size = config["image_size"]
    model = CflowPlus(pre_processor=AnomalibModule.configure_pre_processor((size, size)), **config["kwargs"])
    datamodule = demo_datamodule(root, category, batch_size=16, num_workers=0)
    datamodule.setup()
    dump = LogLikelihoodDump(datamodule, out_dir, every_epoch)
    engine = cpu_engine(out_dir / "run", epochs, [dump], limit_val_batches=0)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    save_ground_truth(datamodule, out_dir, size)
    info = {
        "config": config_name,
        "dataset": dataset_name,
        "seed": seed,
        "epochs": epochs,
        "image_size": size,
        "layers": model.model.layers,
        "train_seconds_per_epoch": dump.train_seconds,
        "fit_seconds": time.perf_counter() - start,
        "train_images": len(datamodule.train_data),
    }
    (out_dir / "info.json").write_text(json.dumps(info, indent=2))
    return out_dir


# ---------------------------------------------------------------------------------------------- analysis

Calibrator = Callable[[list[np.ndarray], list[np.ndarray]], list[torch.Tensor]]


def calibrate_global_exp(train: list[np.ndarray], test: list[np.ndarray]) -> list[torch.Tensor]:
    """Today's ``paper`` mode: per layer ``1 - exp(ll - max over training fibers)``, so larger is more anomalous."""
    return [1.0 - torch.exp(torch.from_numpy(t - tr.max())) for tr, t in zip(train, test, strict=True)]


def calibrate_global_z(train: list[np.ndarray], test: list[np.ndarray]) -> list[torch.Tensor]:
    """Per layer ``(mean - ll) / std`` over training fibers: one constant pair per layer (``zscore``)."""
    return [torch.from_numpy((tr.mean() - t) / tr.std()) for tr, t in zip(train, test, strict=True)]


def calibrate_position_z(train: list[np.ndarray], test: list[np.ndarray]) -> list[torch.Tensor]:
    """Per layer and position ``(mean_p - ll) / std_p`` over the training images' fibers at that position."""
    scores = []
    for tr, t in zip(train, test, strict=True):
        mean, std = tr.mean(axis=0), tr.std(axis=0)
        scores.append(torch.from_numpy((mean - t) / np.maximum(std, 1e-6)))
    return scores


CALIBRATIONS: dict[str, Calibrator] = {
    "global-exp": calibrate_global_exp,
    "global-z": calibrate_global_z,
    "position-z": calibrate_position_z,
}


def anomaly_maps(layer_scores: Sequence[torch.Tensor], image_size: int, sigma: float = 4.0) -> torch.Tensor:
    """Mean of the layers' scores ``(N, h_l, w_l)`` upsampled to ``(N, S, S)`` and Gaussian-smoothed."""
    upsampled = [
        F.interpolate(score.unsqueeze(1).float(), size=(image_size, image_size), mode="bilinear", align_corners=False)
        for score in layer_scores
    ]
    aggregate = torch.stack(upsampled).mean(dim=0)
    if sigma > 0:
        aggregate = GaussianBlur2d(compute_kernel_size(sigma), (sigma, sigma), separable=True)(aggregate)
    return aggregate[:, 0]


def image_scores(maps: torch.Tensor, layer_scores: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Image-score choices from the maps ``(N, S, S)``: max, top 1 % and 0.1 % means, and the mean of layer maxima."""
    flat = maps.flatten(start_dim=1)
    choices = {"max": flat.amax(dim=1)}
    for percent in (1.0, 0.1):
        k = max(1, round(flat.shape[1] * percent / 100))
        choices[f"top{percent:g}%"] = flat.topk(k, dim=1).values.mean(dim=1)
    choices["layer-max-mean"] = torch.stack([score.flatten(start_dim=1).amax(dim=1) for score in layer_scores]).mean(0)
    choices["combined"] = 0.5 * (choices["max"] + choices["layer-max-mean"])  # CflowPlus's image_score="combined"
    return choices


def layer_sets_of(layers: Sequence[str]) -> dict[str, list[int]]:
    """Named layer subsets to analyse: all layers, and for four levels every run of three plus the deepest dropped."""
    sets = {"all": list(range(len(layers)))}
    if len(layers) == 4:
        sets["strides 4/8/16"] = [0, 1, 2]
        sets["strides 8/16/32"] = [1, 2, 3]
        sets["strides 4/8/16/32"] = [0, 1, 2, 3]
        del sets["all"]
    elif len(layers) == 3:
        sets["without deepest"] = [0, 1]
    return sets


def evaluate_run(run_dir: Path, epoch: int, full: bool) -> list[dict[str, Any]]:
    """Accuracy of one training after one epoch: every (layers, calibration, image score) variant if ``full``.

    Otherwise only the layer set ``all`` (or strides 8/16/32) with the two global calibrations.
    """
    info = json.loads((run_dir / "info.json").read_text())
    truth = np.load(run_dir / "ground_truth.npz")
    labels, masks = truth["labels"], truth["masks"]
    arrays = np.load(run_dir / f"llmaps_e{epoch}.npz")
    num_layers = len(info["layers"])
    train_maps = [arrays[f"train_{layer}"].astype(np.float64) for layer in range(num_layers)]
    test_maps = [arrays[f"test_{layer}"].astype(np.float64) for layer in range(num_layers)]
    layer_sets = layer_sets_of(info["layers"])
    calibrations = CALIBRATIONS
    if not full:
        layer_sets = dict(list(layer_sets.items())[:1]) if num_layers == 3 else {"strides 8/16/32": [1, 2, 3]}
        calibrations = {name: CALIBRATIONS[name] for name in ("global-exp", "position-z")}
    rows = []
    base = {key: info[key] for key in ("config", "dataset", "seed", "image_size")}
    for layer_set, picked in layer_sets.items():
        for calibration, calibrate in calibrations.items():
            layer_scores = calibrate([train_maps[i] for i in picked], [test_maps[i] for i in picked])
            maps = anomaly_maps(layer_scores, info["image_size"])
            pixel = {"pixel_auroc": pixel_auroc(maps.numpy(), masks), "aupro": aupro(maps.numpy(), masks)}
            for score_name, scores in image_scores(maps, layer_scores).items():
                rows.append(
                    {
                        **base,
                        "epoch": epoch,
                        "layers": layer_set,
                        "calibration": calibration,
                        "image_score": score_name,
                        "image_auroc": image_auroc(scores.numpy(), labels),
                        **pixel,
                    }
                )
    return rows


def summarize(rows: list[dict[str, Any]], group_keys: Sequence[str]) -> list[dict[str, Any]]:
    """Per variant (``group_keys``) and data set: mean and spread over seeds; plus the mean over real data sets."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[key] for key in group_keys), []).append(row)
    summary = []
    for key, members in groups.items():
        entry: dict[str, Any] = dict(zip(group_keys, key, strict=True))
        datasets = sorted({row["dataset"] for row in members}, key=lambda name: (not is_real(name), name))
        for metric in ("image_auroc", "pixel_auroc", "aupro"):
            per_dataset = {
                dataset: mean_and_spread(row[metric] for row in members if row["dataset"] == dataset)
                for dataset in datasets
            }
            entry[metric] = per_dataset
            seeds = sorted({row["seed"] for row in members})
            real = [d for d in datasets if is_real(d)]
            if real:  # the mean over real data sets, per seed, then its spread over seeds
                per_seed = []
                for seed in seeds:
                    values = [row[metric] for row in members if row["seed"] == seed and row["dataset"] in real]
                    if len(values) == len(real):
                        per_seed.append(float(np.mean(values)))
                if per_seed:
                    entry[metric]["real mean"] = mean_and_spread(per_seed)
        summary.append(entry)
    return summary


def markdown(summary: list[dict[str, Any]], group_keys: Sequence[str], metric: str) -> str:
    """One table of one metric: a row per variant, a column per data set and the real mean."""
    columns = sorted(
        {name for entry in summary for name in entry[metric]}, key=lambda n: (n != "real mean", not is_real(n), n)
    )
    lines = [
        f"| {' | '.join(group_keys)} | {' | '.join(columns)} |",
        f"|{'---|' * (len(group_keys) + len(columns))}",
    ]
    for entry in summary:
        cells = [str(entry[key]) for key in group_keys]
        cells += [format_spread(entry[metric][column]) if column in entry[metric] else "" for column in columns]
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def analyze(
    configs: Sequence[str], datasets: Sequence[str], seeds: Sequence[int], epochs: int, every_epoch: bool
) -> None:
    """Evaluate every cached training, print the study tables and write ``real_studies.json``."""
    rows: list[dict[str, Any]] = []
    for config in configs:
        for dataset in datasets:
            for seed in seeds:
                run_dir = STUDY_DIR / f"{config}_e{epochs}" / dataset.replace("/", "_") / f"seed{seed}"
                if not (run_dir / "info.json").exists():
                    continue
                if every_epoch:
                    for epoch in range(1, epochs + 1):
                        rows += evaluate_run(run_dir, epoch, full=epoch == epochs)
                else:
                    rows += evaluate_run(run_dir, epochs, full=True)
    if not rows:
        print("no trainings found")
        return
    name = f"real_studies_{'-'.join(configs)}_e{epochs}"
    (OUT_DIR / f"{name}.json").write_text(json.dumps(rows, indent=1))
    last = [row for row in rows if row["epoch"] == epochs]
    keys = ["config", "layers", "calibration", "image_score"]
    summary = summarize(last, keys)
    print(f"\n### image_auroc, after epoch {epochs}\n")
    print(markdown(summary, keys, "image_auroc"))
    keys = ["config", "layers", "calibration"]
    summary = summarize([row for row in last if row["image_score"] == "max"], keys)
    for metric in ("pixel_auroc", "aupro"):
        print(f"\n### {metric}, after epoch {epochs}\n")
        print(markdown(summary, keys, metric))
    if every_epoch:
        keys = ["config", "calibration", "image_score", "epoch"]
        picked = [row for row in rows if row["image_score"] in ("top1%", "max", "combined")]
        summary = summarize(picked, keys)
        for metric in ("image_auroc", "aupro"):
            print(f"\n### {metric} after each epoch\n")
            print(markdown(summary, keys, metric))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=["train", "analyze"])
    parser.add_argument("--configs", nargs="+", default=["default"], choices=sorted(CONFIGS))
    parser.add_argument("--datasets", nargs="+", default=None, help="real categories and demo/<texture>")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_REALDEV_ROOT)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--every-epoch", action="store_true", help="dump maps after every epoch, not only the last")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    datasets = args.datasets or [*real_categories(args.data_root), *DEMO_DATASETS]
    if args.stage == "train":
        logging.getLogger("lightning").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")
        for config in args.configs:
            for dataset in datasets:
                for seed in args.seeds:
                    start = time.perf_counter()
                    run_dir = train(config, dataset, seed, args.epochs, args.data_root, args.fresh, args.every_epoch)
                    print(
                        f"{config} {dataset} seed {seed}: {time.perf_counter() - start:.0f} s -> {run_dir}", flush=True
                    )
        return
    analyze(args.configs, datasets, args.seeds, args.epochs, args.every_epoch)


if __name__ == "__main__":
    main()


def save_peak_figures(run_dir: Path, epoch: int, layers: list[int], out_path: Path, count: int = 4) -> None:
    """The ``count`` highest-scoring good test images and their maps, each layer's map beside the sum."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    info = json.loads((run_dir / "info.json").read_text())
    truth = np.load(run_dir / "ground_truth.npz")
    arrays = np.load(run_dir / f"llmaps_e{epoch}.npz")
    train_maps = [arrays[f"train_{layer}"].astype(np.float64) for layer in layers]
    test_maps = [arrays[f"test_{layer}"].astype(np.float64) for layer in layers]
    layer_scores = calibrate_global_z(train_maps, test_maps)
    maps = anomaly_maps(layer_scores, info["image_size"])
    scores = image_scores(maps, layer_scores)["top1%"].numpy()
    good = np.flatnonzero(truth["labels"] == 0)
    worst_good = good[np.argsort(-scores[good])[:count]]
    root, category = dataset_location(info["dataset"], DEFAULT_REALDEV_ROOT)
    paths = sorted((root / category / "test").rglob("*.png"))
    good_paths = [p for p in paths if p.parent.name == "good"]
    figure, axes = plt.subplots(count, 2 + len(layers), figsize=(3 * (2 + len(layers)), 3 * count))
    for row, index in enumerate(worst_good):
        rank = int(np.flatnonzero(good == index)[0])
        axes[row, 0].imshow(Image.open(good_paths[rank]).convert("RGB").resize((info["image_size"],) * 2))
        axes[row, 0].set_title(f"{good_paths[rank].name} score {scores[index]:.2f}")
        axes[row, 1].imshow(maps[index].numpy(), cmap="jet")
        axes[row, 1].set_title("map (global z, mean)")
        for column, score in enumerate(layer_scores):
            axes[row, 2 + column].imshow(score[index].numpy(), cmap="jet", vmin=-2, vmax=8)
            axes[row, 2 + column].set_title(f"layer {info['layers'][layers[column]]} z")
    for axis in axes.flat:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(out_path, dpi=60)
