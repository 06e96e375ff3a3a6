"""The decision logic of the accuracy-latency study: the front, the default's rule, the timing summary."""

import pytest

from benchmarks.front import choose_default, leave_one_out, pareto
from benchmarks.ir_job import summarize_rounds

DATASETS = ("screw", "tire")


def _accuracy(per_dataset: dict[str, float]) -> dict:
    """An accuracy summary entry with these image AUROCs per data set, their mean as the mean."""
    mean = sum(per_dataset.values()) / len(per_dataset)
    return {"image_auroc": {**{d: {"mean": v} for d, v in per_dataset.items()}, "mean": {"mean": mean}}}


def test_pareto_keeps_only_points_no_other_beats_on_both_axes():
    points = {"fast": (10.0, 0.80), "slow_better": (20.0, 0.90), "dominated": (15.0, 0.79), "tie": (20.0, 0.90)}
    assert set(pareto(points)) == {"fast", "slow_better", "tie"}


def test_rule_takes_the_fastest_setting_near_the_best_that_loses_no_category():
    accuracy = {
        "default": _accuracy({"screw": 0.80, "tire": 0.76}),
        "cheap_loses_tire": _accuracy({"screw": 0.83, "tire": 0.74}),  # best mean, but tire -0.02
        "cheaper_far": _accuracy({"screw": 0.70, "tire": 0.70}),
        "near": _accuracy({"screw": 0.80, "tire": 0.765}),
    }
    latency = {"default": 20.0, "cheap_loses_tire": 8.0, "cheaper_far": 5.0, "near": 12.0}
    rule = choose_default(accuracy, latency, DATASETS)
    assert rule["chosen"] == "near"
    fails = {verdict["setting"]: verdict["fails"] for verdict in rule["verdicts"]}
    assert any("tire" in reason for reason in fails["cheap_loses_tire"])
    assert any("best" in reason for reason in fails["cheaper_far"])
    assert [verdict["setting"] for verdict in rule["verdicts"]] == [
        "cheaper_far",
        "cheap_loses_tire",
        "near",
        "default",
    ]


def test_rule_keeps_the_default_when_nothing_cheaper_qualifies():
    accuracy = {"default": _accuracy({"screw": 0.80, "tire": 0.76}), "k4": _accuracy({"screw": 0.78, "tire": 0.76})}
    rule = choose_default(accuracy, {"default": 20.0, "k4": 10.0}, DATASETS)
    assert (rule["chosen"], rule["none_passes"]) == ("default", False)


def test_rule_keeps_the_default_when_the_best_loses_a_category_and_nothing_passes():
    # "wide" is best on the mean only by losing screw; the default is not within the margin of it.
    accuracy = {"default": _accuracy({"screw": 0.80, "tire": 0.76}), "wide": _accuracy({"screw": 0.78, "tire": 0.80})}
    rule = choose_default(accuracy, {"default": 20.0, "wide": 30.0}, DATASETS)
    assert (rule["chosen"], rule["none_passes"]) == ("default", True)


def test_timing_summary_is_per_image_and_ratios_are_per_round():
    # Round 3 is slow for both models (machine noise): the per-round ratio cancels it, the medians stay robust.
    samples = {"ours": [8.0, 8.0, 80.0, 8.0, 8.0], "peer": [16.0, 24.0, 160.0, 16.0, 16.0]}
    summary = summarize_rounds(samples, batch=8, reference="ours")
    assert summary["ours"]["ms_per_image"] == pytest.approx(1.0)
    assert summary["peer"]["ms_per_image"] == pytest.approx(2.0)
    assert summary["peer"]["vs_reference"] == pytest.approx(2.0)
    assert summary["peer"]["vs_reference_q3"] >= 2.0


def test_leave_one_out_chooses_on_the_other_categories_and_reports_the_held_out_one():
    accuracy = {
        "default": _accuracy({"screw": 0.80, "tire": 0.76}),
        "fast": _accuracy({"screw": 0.80, "tire": 0.70}),  # as good on screw, loses tire
    }
    held_out = leave_one_out(accuracy, {"default": 20.0, "fast": 10.0}, DATASETS)
    assert held_out["tire"]["chosen"] == "fast"  # chosen on screw alone
    assert held_out["tire"]["image_auroc"] == pytest.approx(0.70)
    assert held_out["tire"]["default"] == pytest.approx(0.76)
    assert held_out["screw"]["chosen"] == "default"  # on tire alone, fast loses 0.06
