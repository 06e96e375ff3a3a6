"""How to normalize log-likelihoods: per layer, per position, by feature neighbours, or chosen per part.

Post hoc on the maps that ``real_studies.py train`` writes (per-layer log-likelihood maps and features of 100
training images, of every test image, and of the training images with one synthetic defect each): every
candidate turns the same trained decoders' log-likelihoods into scores through CflowPlus's own
:class:`~anomalib_cflow_plus.anomaly_map.AnomalyMapGenerator` (``combined`` image score, sigma 4), so the study
measures what the package computes. Candidates (per layer ``l``, training log-likelihoods ``T``):

* ``layer``: today's calibration, one constant per layer (``paper`` mode).
* ``position w=..``: the log-likelihood minus ``w`` times the position's offset ``mean_i T[i, p] - mean(T)``
  (bilinearly resized to the grid), then ``paper`` mode; ``w=1`` compares each fiber with the training fibers
  at its position (a typicality test per position, after Nalisnick et al., 2019, arXiv:1906.02994).
* ``position-z``: ``(mean_p - ll) / std_p`` (the issue's naive per-position z-score, std floored at 1e-6).
* ``knn k=..``: the log-likelihood minus the mean log-likelihood of its ``k`` nearest training fibers in the
  layer's feature space (a bank of ``--bank`` random training fibers), plus the layer's mean; ``knn-z`` divides by
  their spread.
* ``selected``: ``position w`` with ``w`` in ``--weights`` chosen per part from good images alone: the weight
  whose pseudo-AUROC (good training images against the same images with a synthetic defect, offsets left out
  per image) is highest, unless it beats ``w=0`` by less than ``--margin``.

Usage::

    python -m benchmarks.normalization --datasets tire screw metal_plate --seeds 0 1 2
    python -m benchmarks.normalization --loo     # the leave-one-category-out table of --margin

Writes ``benchmarks/out/normalization.json`` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from anomalib_cflow_plus.anomaly_map import AnomalyMapGenerator
from anomalib_cflow_plus.calibration import LayerStatistics
from benchmarks.harness import (
    DEFAULT_REALDEV_ROOT,
    OUT_DIR,
    aupro,
    dataset_location,
    demo_datamodule,
    format_spread,
    image_auroc,
    is_real,
    mean_and_spread,
    pixel_auroc,
)

STUDY_DIR = OUT_DIR / "real_studies"
Maps = list[torch.Tensor]  # one (N, h_l, w_l) float64 tensor per layer


def load_run(run_dir: Path, epoch: int) -> dict[str, Any]:
    """The maps, features, labels and masks of one training."""
    info = json.loads((run_dir / "info.json").read_text())
    truth = np.load(run_dir / "ground_truth.npz")
    arrays = np.load(run_dir / f"llmaps_e{epoch}.npz")
    layers = len(info["layers"])

    def maps(split: str) -> Maps:
        return [torch.from_numpy(arrays[f"{split}_{layer}"]).double() for layer in range(layers)]

    def features(split: str) -> list[torch.Tensor]:
        return [torch.from_numpy(arrays[f"{split}feat_{layer}"]).float() for layer in range(layers)]

    return {
        "info": info,
        "labels": truth["labels"],
        "masks": truth["masks"],
        "train": maps("train"),
        "test": maps("test"),
        "synth": maps("synth"),
        "train_features": features("train"),
        "test_features": features("test"),
    }


# ------------------------------------------------------------------------------------------------ scoring


def score(log_likelihoods: Maps, reference: Maps, image_size: int, mode: str = "paper") -> tuple[torch.Tensor, ...]:
    """Maps ``(N, S, S)`` and image scores ``(N,)`` of adjusted log-likelihoods, calibrated on ``reference``.

    ``mode="paper"``: CflowPlus's default scoring, with each layer's maximum taken over ``reference`` (the training
    images' adjusted log-likelihoods); ``mode="z"``: the inputs are already anomaly scores (higher is worse).
    """
    generator = AnomalyMapGenerator(len(log_likelihoods), score_mode="paper" if mode == "paper" else "zscore")
    layers = len(log_likelihoods)
    if mode == "paper":
        maximum = torch.stack([values.max() for values in reference]).float()
        generator.set_calibration(maximum, torch.zeros(layers), torch.ones(layers))
        inputs = [values.float() for values in log_likelihoods]
    else:  # zscore computes (mean - ll) / std: mean 0, std 1 and ll = -score
        generator.set_calibration(torch.zeros(layers), torch.zeros(layers), torch.ones(layers))
        inputs = [-values.float() for values in log_likelihoods]
    return generate(generator, inputs, image_size)


def generate(generator: AnomalyMapGenerator, log_likelihoods: Maps, image_size: int) -> tuple[torch.Tensor, ...]:
    """Maps ``(N, S, S)`` and image scores ``(N,)`` of ``generator`` over L maps ``(N, h_l, w_l)``, 32 at a time."""
    maps, scores = [], []
    with torch.no_grad():
        for start in range(0, len(log_likelihoods[0]), 32):
            batch = [values[start : start + 32].float() for values in log_likelihoods]
            anomaly_map, image_score = generator(batch, (image_size,) * 2)
            maps.append(anomaly_map[:, 0])
            scores.append(image_score)
    return torch.cat(maps), torch.cat(scores)


def resized(offset: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """A per-position map ``(h, w)`` bilinearly resized onto ``grid``, as the package does for other input sizes."""
    if tuple(offset.shape) == tuple(grid):
        return offset
    return F.interpolate(offset[None, None], size=tuple(grid), mode="bilinear", align_corners=False)[0, 0]


def position_offsets(train: Maps, forgive_only: bool = False) -> Maps:
    """Per layer, each position's mean training log-likelihood minus the layer's: ``(h_l, w_l)``.

    ``forgive_only``: only positions less likely than the layer's median position get an offset (negative), so
    that consistently likely regions (plain background) are not made more sensitive.
    """
    if forgive_only:
        return [(values.mean(dim=0) - values.mean(dim=0).median()).clamp_max(0) for values in train]
    return [values.mean(dim=0) - values.mean() for values in train]


def leave_one_out_offsets(train: Maps) -> Maps:
    """Per layer, image ``i``'s offsets from the other training images: ``(N, h_l, w_l)``."""
    offsets = []
    for values in train:
        count = len(values)
        position_mean = (values.sum(dim=0) - values) / (count - 1)  # (N, h, w)
        layer_mean = (values.sum() - values.sum(dim=(1, 2))) / ((count - 1) * values[0].numel())  # (N,)
        offsets.append(position_mean - layer_mean[:, None, None])
    return offsets


def shift(maps: Maps, offsets: Maps, weight: float) -> Maps:
    """``ll - weight * offset`` per layer; offsets ``(h, w)`` (resized to the grid) or ``(N, h, w)``."""
    return [
        values - weight * (offset if offset.dim() == 3 else resized(offset, values.shape[-2:]))
        for values, offset in zip(maps, offsets, strict=True)
    ]


def pseudo_auroc(run: dict[str, Any], weight: float) -> float:
    """Image AUROC of good training images against the same images with a synthetic defect, at ``weight``."""
    offsets = leave_one_out_offsets(run["train"])
    good = shift(run["train"], offsets, weight)
    count = len(run["synth"][0])
    synthetic = shift(run["synth"], [offset[:count] for offset in offsets], weight)
    size = run["info"]["image_size"]
    good_scores = score(good, good, size)[1]
    synthetic_scores = score(synthetic, good, size)[1]
    labels = np.r_[np.zeros(len(good_scores)), np.ones(len(synthetic_scores))]
    return image_auroc(np.r_[good_scores.numpy(), synthetic_scores.numpy()], labels)


def select_weight(pseudo: dict[float, float], margin: float) -> float:
    """The weight with the best pseudo-AUROC, or 0 (today's) unless it beats ``w=0`` by at least ``margin``."""
    best = max(pseudo, key=lambda weight: (pseudo[weight], -weight))
    return best if pseudo[best] - pseudo[0.0] >= margin else 0.0


def knn_baseline(
    features: list[torch.Tensor], train: Maps, train_features: list[torch.Tensor], k: int, bank: int, seed: int
) -> tuple[Maps, Maps]:
    """Per layer, the mean and std ``(N, h, w)`` of the log-likelihoods of each fiber's ``k`` nearest bank fibers."""
    generator = torch.Generator().manual_seed(seed)
    means, stds = [], []
    for query, values, reference in zip(features, train, train_features, strict=True):
        flat_reference = reference.reshape(-1, reference.shape[-1])
        picked = torch.randperm(len(flat_reference), generator=generator)[:bank]
        bank_features, bank_values = flat_reference[picked], values.reshape(-1)[picked]
        flat_query = query.reshape(-1, query.shape[-1])
        mean, std = [], []
        for start in range(0, len(flat_query), 8192):
            distances = torch.cdist(flat_query[start : start + 8192], bank_features)
            neighbours = bank_values[distances.topk(k, largest=False).indices]  # (q, k)
            mean.append(neighbours.mean(dim=1))
            std.append(neighbours.std(dim=1))
        means.append(torch.cat(mean).reshape(query.shape[:-1]))
        stds.append(torch.cat(std).reshape(query.shape[:-1]))
    return means, stds


# ------------------------------------------------------------------------------------------------ candidates

Candidate = Callable[[dict[str, Any]], tuple[Maps, Maps, str]]  # run -> (test maps, reference maps, mode)


def layer_candidate(run: dict[str, Any]) -> tuple[Maps, Maps, str]:
    return run["test"], run["train"], "paper"


def position_candidate(weight: float) -> Candidate:
    def candidate(run: dict[str, Any]) -> tuple[Maps, Maps, str]:
        offsets = position_offsets(run["train"])
        return shift(run["test"], offsets, weight), shift(run["train"], offsets, weight), "paper"

    return candidate


def linear_position_candidate(weight: float) -> Candidate:
    """``(mean_l + weight * offset_p - ll) / std_l``: the shift without ``paper`` mode's saturating exponential."""

    def candidate(run: dict[str, Any]) -> tuple[Maps, Maps, str]:
        offsets = position_offsets(run["train"])
        scores = [
            (values.mean() - t) / values.std()
            for values, t in zip(run["train"], shift(run["test"], offsets, weight), strict=True)
        ]
        return scores, scores, "z"

    return candidate


def forgiving_candidate(weight: float, score_only: bool = False) -> Candidate:
    """``position`` with offsets only where a position is less likely than the layer's median position."""

    def candidate(run: dict[str, Any]) -> tuple[Maps, Maps, str]:
        offsets = position_offsets(run["train"], forgive_only=True)
        return shift(run["test"], offsets, weight), shift(run["train"], offsets, weight), "paper"

    return candidate


def position_z_candidate(run: dict[str, Any]) -> tuple[Maps, Maps, str]:
    scores = []
    for values, test in zip(run["train"], run["test"], strict=True):
        scores.append((values.mean(dim=0) - test) / values.std(dim=0).clamp_min(1e-6))
    return scores, scores, "z"


def knn_candidate(k: int, bank: int, z: bool) -> Candidate:
    def candidate(run: dict[str, Any]) -> tuple[Maps, Maps, str]:
        mean, std = knn_baseline(run["test_features"], run["train"], run["train_features"], k, bank, seed=0)
        if z:
            scores = [(m - t) / s.clamp_min(1e-6) for m, s, t in zip(mean, std, run["test"], strict=True)]
            return scores, scores, "z"
        # The training fibers' own baseline would include themselves; the reference max is taken from a bank
        # baseline of the training images against the same bank, which is close enough for a ranking study.
        train_mean, _ = knn_baseline(run["train_features"], run["train"], run["train_features"], k, bank, seed=0)
        layer_means = [values.mean() for values in run["train"]]
        test = [t - m + c for t, m, c in zip(run["test"], mean, layer_means, strict=True)]
        train = [t - m + c for t, m, c in zip(run["train"], train_mean, layer_means, strict=True)]
        return test, train, "paper"

    return candidate


def selected_candidate(weights: Sequence[float], margin: float) -> Candidate:
    def candidate(run: dict[str, Any]) -> tuple[Maps, Maps, str]:
        pseudo = run.setdefault("pseudo", {})
        for weight in weights:
            if weight not in pseudo:
                pseudo[weight] = pseudo_auroc(run, weight)
        chosen = select_weight({w: pseudo[w] for w in weights}, margin)
        run["chosen_weight"] = chosen
        return position_candidate(chosen)(run)

    return candidate


def package_statistics(run: dict[str, Any]) -> LayerStatistics:
    """The package's calibration statistics of the run's training maps."""
    statistics = LayerStatistics(len(run["train"]))
    statistics.update([values.float() for values in run["train"]])
    return statistics


def evaluate_package(run: dict[str, Any], image_calibration: str, with_aupro: bool) -> dict[str, float]:
    """Accuracy of CflowPlus's own calibration and scoring (defaults but ``image_calibration``) on the test maps."""
    generator = AnomalyMapGenerator(len(run["train"]))
    generator.set_calibration(*package_statistics(run).finalize(image_calibration))
    maps, scores = generate(generator, run["test"], run["info"]["image_size"])
    result = {
        "image_auroc": image_auroc(scores.numpy(), run["labels"]),
        "pixel_auroc": pixel_auroc(maps.numpy(), run["masks"]),
        "position_calibrated": generator.position_calibrated,
    }
    if with_aupro:
        result["aupro"] = aupro(maps.numpy(), run["masks"])
    return result


def evaluate(run: dict[str, Any], candidate: Candidate, with_aupro: bool, score_only: bool = False) -> dict[str, float]:
    test, reference, mode = candidate(run)
    maps, scores = score(test, reference, run["info"]["image_size"], mode)
    if score_only:  # the map stays today's; only the image score comes from the candidate
        maps = score(run["test"], run["train"], run["info"]["image_size"])[0]
    result = {
        "image_auroc": image_auroc(scores.numpy(), run["labels"]),
        "pixel_auroc": pixel_auroc(maps.numpy(), run["masks"]),
    }
    if with_aupro:
        result["aupro"] = aupro(maps.numpy(), run["masks"])
    return result


def run_dirs(config: str, epochs: int, datasets: Sequence[str], seeds: Sequence[int]) -> list[Path]:
    dirs = []
    for dataset in datasets:
        for seed in seeds:
            path = STUDY_DIR / f"{config}_e{epochs}" / dataset.replace("/", "_") / f"seed{seed}"
            if (path / f"llmaps_e{epochs}.npz").exists():
                dirs.append(path)
    return dirs


def table(rows: list[dict[str, Any]], metric: str) -> str:
    datasets = sorted({row["dataset"] for row in rows}, key=lambda n: (not is_real(n), n))
    candidates = list(dict.fromkeys(row["candidate"] for row in rows))
    lines = [f"| {metric} | real mean | " + " | ".join(datasets) + " |", "|" + "---|" * (2 + len(datasets))]
    for name in candidates:
        mine = [row for row in rows if row["candidate"] == name and metric in row]
        cells = []
        for dataset in datasets:
            values = [row[metric] for row in mine if row["dataset"] == dataset]
            cells.append(format_spread(mean_and_spread(values)) if values else "")
        real = [d for d in datasets if is_real(d)]
        per_seed = []
        for seed in sorted({row["seed"] for row in mine}):
            values = [row[metric] for row in mine if row["seed"] == seed and row["dataset"] in real]
            if len(values) == len(real):
                per_seed.append(float(np.mean(values)))
        mean_cell = format_spread(mean_and_spread(per_seed)) if per_seed else ""
        lines.append(f"| {name} | {mean_cell} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def leave_one_out(rows: list[dict[str, Any]], categories: Sequence[str]) -> str:
    """The gate's threshold chosen on all real categories but one, and the held-out category's result with it.

    For every threshold of a grid, each run takes the position-calibrated image score when its least concentrated
    layer reaches it (``image_calibration="auto"``'s rule), else the layer's. The threshold is the middle of those
    that maximise the mean image AUROC over the chosen categories' runs.
    """
    runs = {}
    for row in rows:
        key = (row["dataset"], row["seed"])
        if row["candidate"] == "concentration":
            runs.setdefault(key, {})["concentration"] = min(row["per_layer"])
        elif row["candidate"] == "CflowPlus image_calibration=position":
            runs.setdefault(key, {})["position"] = row["image_auroc"]
        elif row["candidate"] == "layer":
            runs.setdefault(key, {})["layer"] = row["image_auroc"]
    grid = [round(0.05 * step, 2) for step in range(1, 20)]

    def auroc(run: dict[str, float], threshold: float) -> float:
        return run["position"] if run["concentration"] >= threshold else run["layer"]

    lines = [
        "| held out | threshold range that is best on the other two | chosen | held out: layer | held out: chosen |"
        " held out: threshold 0.5 |",
        "|---|---|---|---|---|---|",
    ]
    for held_out in categories:
        chosen_runs = [run for (dataset, _), run in runs.items() if dataset in categories and dataset != held_out]
        held = [run for (dataset, _), run in runs.items() if dataset == held_out]
        if not chosen_runs or not held:
            continue
        means = {threshold: float(np.mean([auroc(run, threshold) for run in chosen_runs])) for threshold in grid}
        best = [threshold for threshold in grid if means[threshold] >= max(means.values()) - 1e-9]
        threshold = best[len(best) // 2]
        cells = [
            f"{best[0]:.2f} to {best[-1]:.2f}",
            f"{threshold:.2f}",
            format_spread(mean_and_spread(run["layer"] for run in held)),
            format_spread(mean_and_spread(auroc(run, threshold) for run in held)),
            format_spread(mean_and_spread(auroc(run, 0.5) for run in held)),
        ]
        lines.append(f"| {held_out} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_figure(run: dict[str, Any], out_path: Path, count: int = 3) -> None:
    """The ``count`` highest-scoring good and defective test images (by today's score): image, map, position z-map.

    Each row gives the image score under the layer calibration and under the position calibration.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    info = run["info"]
    root, category = dataset_location(info["dataset"], DEFAULT_REALDEV_ROOT)
    datamodule = demo_datamodule(root, category, num_workers=0)
    datamodule.setup()
    paths = list(datamodule.test_data.samples.image_path)
    size = info["image_size"]
    statistics = package_statistics(run)
    layer, position = AnomalyMapGenerator(len(run["train"])), AnomalyMapGenerator(len(run["train"]))
    layer.set_calibration(*statistics.finalize("layer"))
    position.set_calibration(*statistics.finalize("position"))
    test = [values.float() for values in run["test"]]
    with torch.no_grad():
        layer_map, layer_score = layer(test, (size, size))
        position_scores = position.position_scores(test)
        position_map = position.smoothed_map(position_scores, (size, size), "zscore")
        position_score = position(test, (size, size))[1]
    picked = []
    for label in (0, 1):
        members = np.flatnonzero(run["labels"] == label)
        picked += list(members[np.argsort(-layer_score.numpy()[members])[:count]])
    figure, axes = plt.subplots(len(picked), 3, figsize=(7.5, 2.5 * len(picked)))
    for row, index in enumerate(picked):
        image = Image.open(paths[index]).convert("RGB").resize((size, size))
        kind = "good" if run["labels"][index] == 0 else Path(paths[index]).parent.name
        axes[row, 0].imshow(image)
        axes[row, 0].set_title(f"{kind} {Path(paths[index]).stem}", fontsize=8)
        axes[row, 1].imshow(image)
        axes[row, 1].imshow(layer_map[index, 0].numpy(), cmap="jet", alpha=0.5)
        axes[row, 1].set_title(f"map; score (layer) {float(layer_score[index]):.3f}", fontsize=8)
        axes[row, 2].imshow(image)
        axes[row, 2].imshow(position_map[index, 0].numpy(), cmap="jet", alpha=0.5)
        axes[row, 2].set_title(f"position z; score {float(position_score[index]):.2f}", fontsize=8)
        if run["labels"][index] == 1:
            for column in (1, 2):
                axes[row, column].contour(run["masks"][index], levels=[0.5], colors="white", linewidths=0.6)
    for axis in axes.flat:
        axis.axis("off")
    figure.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=45)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--datasets", nargs="+", default=["tire", "screw", "metal_plate", "demo/brick", "demo/grass",
                                                          "demo/gravel"])  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--weights", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--margin", type=float, default=0.0)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--bank", type=int, default=4096)
    parser.add_argument("--aupro", action="store_true", help="also AUPRO (slow)")
    parser.add_argument("--quick", action="store_true", help="only layer, position w=1 and selected")
    parser.add_argument("--figures", action="store_true", help="save benchmarks/figures/normalization_<data>.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.figures:
        for run_dir in run_dirs(args.config, args.epochs, args.datasets, args.seeds[:1]):
            run = load_run(run_dir, args.epochs)
            name = run["info"]["dataset"].replace("/", "_")
            save_figure(run, Path(__file__).parent / "figures" / f"normalization_{name}.png")
        return
    candidates: dict[str, Candidate] = {"layer": layer_candidate}
    for weight in args.weights[1:]:
        candidates[f"position w={weight:g}"] = position_candidate(weight)
    if not args.quick:
        candidates["position-z"] = position_z_candidate
        candidates["layer-z"] = linear_position_candidate(0.0)
        for weight in args.weights[1:]:
            candidates[f"position-lin w={weight:g}"] = linear_position_candidate(weight)
        candidates[f"knn k={args.k}"] = knn_candidate(args.k, args.bank, z=False)
        candidates[f"knn-z k={args.k}"] = knn_candidate(args.k, args.bank, z=True)
    for weight in args.weights[1:]:
        candidates[f"forgive w={weight:g}"] = forgiving_candidate(weight)
    score_only = {"position w=1, score only": position_candidate(1.0)}
    candidates[f"selected (margin {args.margin:g})"] = selected_candidate(args.weights, args.margin)
    rows = []
    for run_dir in run_dirs(args.config, args.epochs, args.datasets, args.seeds):
        run = load_run(run_dir, args.epochs)
        base = {"dataset": run["info"]["dataset"], "seed": run["info"]["seed"]}
        for name, candidate in candidates.items():
            rows.append({**base, "candidate": name, **evaluate(run, candidate, args.aupro)})
        for name, candidate in score_only.items():
            rows.append({**base, "candidate": name, **evaluate(run, candidate, args.aupro, score_only=True)})
        for image_calibration in ("position", "auto"):
            name = f"CflowPlus image_calibration={image_calibration}"
            rows.append({**base, "candidate": name, **evaluate_package(run, image_calibration, args.aupro)})
        concentration = package_statistics(run).peak_concentration()
        rows.append({**base, "candidate": "concentration", "per_layer": concentration})
        print(base, "peak concentration per layer", [round(c, 2) for c in concentration], flush=True)
        rows.append({**base, "candidate": "pseudo", **{f"w={w:g}": v for w, v in run.get("pseudo", {}).items()},
                     "chosen_weight": run.get("chosen_weight")})  # fmt: skip
        print(base, {w: round(v, 3) for w, v in run.get("pseudo", {}).items()}, "->", run.get("chosen_weight"),
              flush=True)  # fmt: skip
    (OUT_DIR / "normalization.json").write_text(json.dumps(rows, indent=1))
    real = [dataset for dataset in args.datasets if is_real(dataset)]
    print("\n### leave one category out: the gate's threshold\n")
    print(leave_one_out(rows, real))
    scored = [row for row in rows if row["candidate"] not in ("pseudo", "concentration")]
    for metric in ("image_auroc", "pixel_auroc", "aupro"):
        if any(metric in row for row in scored):
            print(f"\n### {metric}\n")
            print(table(scored, metric))


if __name__ == "__main__":
    main()
