"""CflowPlusPostProcessor: which thresholds it learns from a validation split, with and without defects."""

import logging

import pytest
import torch
from anomalib.data import ImageBatch
from anomalib.post_processing import PostProcessor

from anomalib_cflow_plus.post_processor import CflowPlusPostProcessor


def validation_batch(scores, labels, map_peaks):
    """A batch of 8x8 maps whose maxima are ``map_peaks``; masks cover the peak pixel of anomalous images."""
    count = len(scores)
    anomaly_map = torch.zeros(count, 8, 8)
    anomaly_map[:, 3, 4] = torch.tensor(map_peaks)
    gt_mask = torch.zeros(count, 8, 8, dtype=torch.bool)
    gt_mask[torch.tensor(labels).bool(), 3, 4] = True
    return ImageBatch(
        image=torch.zeros(count, 3, 8, 8),
        gt_label=torch.tensor(labels),
        gt_mask=gt_mask,
        pred_score=torch.tensor(scores),
        anomaly_map=anomaly_map,
    )


def validate(post_processor, batches):
    for batch in batches:
        post_processor.on_validation_batch_end(None, None, batch)
    post_processor.on_validation_epoch_end(None, None)


GOOD_SCORES = [float(value) for value in range(1, 21)]  # 1 .. 20
GOOD_PEAKS = [10.0 * value for value in GOOD_SCORES]


def good_batches():
    return [
        validation_batch(GOOD_SCORES[:12], [0] * 12, GOOD_PEAKS[:12]),
        validation_batch(GOOD_SCORES[12:], [0] * 8, GOOD_PEAKS[12:]),
    ]


@pytest.mark.parametrize("mode", ["normal", "auto"])
def test_thresholds_are_quantiles_of_good_scores(mode):
    post_processor = CflowPlusPostProcessor(threshold=mode, normal_fpr=0.1)
    validate(post_processor, good_batches())
    expected = torch.quantile(torch.tensor(GOOD_SCORES), 0.9)
    torch.testing.assert_close(post_processor.image_threshold, expected)
    torch.testing.assert_close(post_processor.pixel_threshold, 10 * expected)
    # normalization still maps the threshold to 0.5
    assert (
        float(post_processor._normalize(expected, post_processor.image_min, post_processor.image_max, expected)) == 0.5
    )


def test_auto_keeps_anomalibs_f1_threshold_when_validation_has_defects():
    batches = [*good_batches(), validation_batch([30.0, 40.0], [1, 1], [300.0, 400.0])]
    ours, anomalib = CflowPlusPostProcessor(threshold="auto"), PostProcessor()
    validate(ours, batches)
    validate(anomalib, batches)
    torch.testing.assert_close(ours.image_threshold, anomalib.image_threshold)
    torch.testing.assert_close(ours.pixel_threshold, anomalib.pixel_threshold)
    assert 20.0 <= float(ours.image_threshold) <= 30.0


def test_normal_ignores_defective_validation_images():
    batches = [*good_batches(), validation_batch([30.0, 40.0], [1, 1], [300.0, 400.0])]
    post_processor = CflowPlusPostProcessor(threshold="normal", normal_fpr=0.1)
    validate(post_processor, batches)
    torch.testing.assert_close(post_processor.image_threshold, torch.quantile(torch.tensor(GOOD_SCORES), 0.9))


def test_f1_without_defects_warns_and_keeps_anomalibs_threshold(caplog):
    post_processor = CflowPlusPostProcessor(threshold="f1")
    with caplog.at_level(logging.WARNING):
        validate(post_processor, good_batches())
    assert "holds no defective image" in caplog.text
    assert float(post_processor.image_threshold) == max(GOOD_SCORES)  # anomalib 2.7's fallback: the highest score


def test_too_few_good_images_for_the_rate_warns(caplog):
    post_processor = CflowPlusPostProcessor(threshold="normal", normal_fpr=0.01)
    with caplog.at_level(logging.WARNING):
        validate(post_processor, good_batches())
    assert "cannot be resolved below about 1/20" in caplog.text


def test_each_validation_epoch_starts_afresh():
    post_processor = CflowPlusPostProcessor(threshold="normal", normal_fpr=0.5)
    validate(post_processor, good_batches())
    validate(post_processor, [validation_batch([100.0, 200.0], [0, 0], [1.0, 2.0])])
    assert float(post_processor.image_threshold) == 150.0


def test_mode_and_rate_are_checkpointed():
    post_processor = CflowPlusPostProcessor(threshold="normal", normal_fpr=0.02)
    restored = CflowPlusPostProcessor()
    restored.load_checkpoint_config(post_processor.checkpoint_config())
    assert (restored.threshold, restored.normal_fpr) == ("normal", 0.02)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"threshold": "otsu"}, "threshold must be one of"), ({"normal_fpr": 0.0}, "normal_fpr must lie in")],
)
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CflowPlusPostProcessor(**kwargs)


def test_the_docstring_example_runs():
    import doctest

    from anomalib_cflow_plus import post_processor

    result = doctest.testmod(post_processor)
    assert result.attempted > 0  # the examples are there and ran
    assert result.failed == 0


NAN = float("nan")


@pytest.mark.parametrize(
    ("norm_min", "norm_max", "threshold", "exact"),
    [
        (-1.0, 2.0, 0.7, True),  # a range
        (-1.0, 2.0, NAN, True),  # no threshold: the mid-range
        (0.7, 0.7, 0.7, True),  # a zero range: a step at the threshold
        (0.7, 0.7, NAN, True),
        (NAN, 2.0, 0.7, False),  # never normalized: the predictions, to a rounding
        (NAN, NAN, NAN, False),
    ],
)
def test_one_pass_normalization_is_anomalibs(norm_min, norm_max, threshold, exact):
    preds = torch.cat([3 * torch.randn(5000, generator=torch.Generator().manual_seed(0)), torch.tensor([0.7, 0.7001])])
    bounds = [torch.tensor(value) for value in (norm_min, norm_max, threshold)]
    expected = PostProcessor._normalize(preds, *bounds)
    normalized = CflowPlusPostProcessor._normalize(preds, *bounds)
    if exact:
        assert torch.equal(normalized, expected)
    else:
        torch.testing.assert_close(normalized, expected, atol=1e-6, rtol=0)
    assert CflowPlusPostProcessor._normalize(None, *bounds) is None
