"""The evidence study's decisions: the default's rule, the gate's thresholds, the shipped gate per training."""

import pytest

from anomalib_cflow_plus.calibration import PEAK_CONCENTRATION_THRESHOLD, PEAK_MIN_IMAGES
from benchmarks.evidence import gate_fires, gate_study, gate_threshold, passes_rule, rows, summarize

DATASETS = ("screw", "tire", "demo/brick")


def _summary(per_dataset: dict[str, tuple[float, float, float]]) -> dict:
    """A summary with these (image AUROC, pixel AUROC, AUPRO) per data set, one seed, real mean over screw and tire."""
    per_seed = {dataset: {0: dict(zip(("image_auroc", "pixel_auroc", "aupro"), v, strict=True))} for dataset, v in
                per_dataset.items()}  # fmt: skip
    return summarize(per_seed, DATASETS)


def test_a_new_default_must_raise_both_means_and_lose_nowhere():
    baseline = _summary({"screw": (0.80, 0.92, 0.74), "tire": (0.77, 0.95, 0.82), "demo/brick": (1.0, 0.99, 0.94)})
    better = _summary({"screw": (0.82, 0.93, 0.75), "tire": (0.78, 0.95, 0.83), "demo/brick": (1.0, 0.99, 0.94)})
    assert passes_rule(better, baseline, DATASETS)["passed"]
    # a better mean that loses 0.02 of AUPRO on the texture fails, and says where
    loses_texture = _summary({"screw": (0.85, 0.93, 0.80), "tire": (0.80, 0.95, 0.85), "demo/brick": (1.0, 0.99, 0.92)})
    verdict = passes_rule(loses_texture, baseline, DATASETS)
    assert not verdict["passed"]
    assert list(verdict["losses"]) == ["demo/brick aupro"]
    # a gain in image AUROC alone, with the same AUPRO, does not raise both means
    same_maps = _summary({"screw": (0.85, 0.92, 0.74), "tire": (0.80, 0.95, 0.82), "demo/brick": (1.0, 0.99, 0.94)})
    assert not passes_rule(same_maps, baseline, DATASETS)["passed"]


def _gate_table(**categories: tuple[list[float], float]) -> dict:
    return {name: {"concentration": c, "gain": gain} for name, (c, gain) in categories.items()}


def test_gate_thresholds_separate_gaining_categories_or_give_up():
    table = _gate_table(tire=([0.69, 0.72], 0.19), metal=([0.29, 0.38], -0.02), screw=([0.1], -0.2))
    assert gate_threshold(table, "midpoint") == pytest.approx((0.69 + 0.38) / 2)
    assert gate_threshold(table, "lowest gainer") == pytest.approx(0.69)
    assert gate_threshold(table, "fixed") == PEAK_CONCENTRATION_THRESHOLD
    overlapping = {**table, "fryum": {"concentration": [0.32, 0.46], "gain": 0.05}}  # gains, inside metal's range
    assert gate_threshold(overlapping, "midpoint") is None
    assert gate_threshold(overlapping, "lowest gainer") is None
    assert gate_threshold(_gate_table(metal=([0.3], -0.02)), "midpoint") is None  # nothing gains: never fire


def _result(dataset: str, seed: int, concentration: float, layer: float, position: float, images: int = 100) -> dict:
    metrics = {"pixel_auroc": 0.9, "aupro": 0.8}
    return {
        "model_kwargs": {}, "image_size": 256, "epochs": 3, "dataset": dataset, "seed": seed,
        "variants": {
            "peak_concentration": [concentration, 1.0], "train_images": images,
            "combined": {"image_auroc": layer, **metrics}, "position combined": {"image_auroc": position, **metrics},
        },
    }  # fmt: skip


def test_the_shipped_gate_is_scored_per_training_and_needs_enough_images():
    assert gate_fires(_result("tire", 0, 0.7, 0.5, 0.8)["variants"])
    assert not gate_fires(_result("screw", 0, 0.1, 0.8, 0.6)["variants"])
    assert not gate_fires(_result("tiny", 0, 1.0, 0.5, 0.8, images=PEAK_MIN_IMAGES - 1)["variants"])
    table = rows([_result("tire", 0, 0.7, 0.5, 0.8), _result("screw", 0, 0.1, 0.8, 0.6)])
    assert table[("default", "auto")]["tire"][0]["image_auroc"] == 0.8  # position, where the gate fires
    assert table[("default", "auto")]["screw"][0]["image_auroc"] == 0.8  # layer, where it does not


def test_gate_study_reads_each_held_out_category_at_a_threshold_fitted_without_it():
    results = [
        _result("tire", 0, 0.70, 0.58, 0.77),
        _result("metal", 0, 0.35, 0.99, 0.97),
        _result("fryum", 0, 0.45, 0.89, 0.94),
    ]
    study = gate_study(results, ["tire", "metal", "fryum"], "default")
    held_out_metal = study["leave_one_out"]["metal"]["lowest gainer"]
    assert held_out_metal["threshold"] == pytest.approx(0.45)  # fitted on tire and fryum: metal (0.35) stays off
    assert held_out_metal["fires"] == "0/1"
    held_out_fryum = study["leave_one_out"]["fryum"]["midpoint"]
    assert held_out_fryum["threshold"] == pytest.approx((0.70 + 0.35) / 2)  # fryum's gain is not seen: it stays off
    assert held_out_fryum["image_auroc_change"] == 0.0
    assert study["leave_one_out"]["tire"]["fixed"]["image_auroc_change"] == pytest.approx(0.77 - 0.58)
