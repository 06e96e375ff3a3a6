"""Thresholds from good images only: a validation split without defects still gives usable labels.

anomalib's F1-adaptive threshold needs defective validation images. Here the validation split is a share of
the good training images (``val_split_mode="from_train"``), held out from the flows' fitting, as on a line
where no defect has been collected yet.
"""

import logging

import openvino as ov
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from anomalib.post_processing import PostProcessor
from lightning.pytorch import seed_everything

from anomalib_cflow_plus import CflowPlus, CflowPlusPostProcessor
from anomalib_cflow_plus.data import generate_demo_dataset

pytestmark = pytest.mark.slow

TARGET_FPR = 0.05
F32 = {"INFERENCE_PRECISION_HINT": "f32"}


@pytest.fixture(scope="module")
def good_only_validation(tmp_path_factory):
    """A demo dataset whose validation split is 12 good training images; 20 good and 20 defective test images."""
    root = generate_demo_dataset(
        tmp_path_factory.mktemp("threshold_demo"),
        textures=("brick",),
        image_size=128,
        n_train=48,
        n_test_good=20,
        n_test_defect=5,
    )
    return MVTecAD(
        root=root,
        category="brick",
        train_batch_size=12,
        eval_batch_size=20,
        num_workers=0,
        val_split_mode="from_train",
        val_split_ratio=0.25,
        seed=0,
    )


@pytest.fixture(scope="module")
def fitted(good_only_validation, tmp_path_factory):
    """CflowPlus with ``threshold="normal"``, fitted 2 epochs; its validation saw good images only."""
    seed_everything(42)
    model = CflowPlus(threshold="normal", normal_fpr=TARGET_FPR)
    engine = Engine(
        max_epochs=2, default_root_dir=tmp_path_factory.mktemp("run"), accelerator="cpu", devices=1, logger=False
    )
    engine.fit(model, datamodule=good_only_validation)
    return model, engine


def fresh_engine(tmp_path):
    """An engine for a model whose post-processor was swapped: a reused trainer would keep running the old one."""
    return Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False)


def labels_on_test(model, engine, datamodule):
    """``(pred_label, gt_label)`` over the test split, post-processed by the model's post-processor."""
    batches = engine.predict(model, dataloaders=datamodule.test_dataloader())
    predicted = torch.cat([batch.pred_label.flatten() for batch in batches]).bool()
    truth = torch.cat([batch.gt_label.flatten() for batch in batches]).bool()
    return predicted, truth


def f1_and_fpr(predicted, truth):
    true_positives = int((predicted & truth).sum())
    f1 = 2 * true_positives / (int(predicted.sum()) + int(truth.sum()))
    return f1, float(predicted[~truth].float().mean())


def test_validation_split_has_no_defect(fitted, good_only_validation):
    labels = torch.cat([batch.gt_label for batch in good_only_validation.val_dataloader()])
    assert len(labels) == 12 and not labels.any()


def test_normal_threshold_labels_test_images(fitted, good_only_validation):
    model, engine = fitted
    post_processor = model.post_processor
    assert isinstance(post_processor, CflowPlusPostProcessor)
    assert torch.isfinite(post_processor.image_threshold) and torch.isfinite(post_processor.pixel_threshold)
    predicted, truth = labels_on_test(model, engine, good_only_validation)
    f1, fpr = f1_and_fpr(predicted, truth)
    assert f1 >= 0.9, (f1, fpr)
    assert fpr <= TARGET_FPR + 0.1, fpr  # 20 good test images: one false positive is 0.05
    # pred_mask comes from the pixel threshold: empty on most good test images, not on most defective ones
    batches = engine.predict(model, dataloaders=good_only_validation.test_dataloader())
    flagged = torch.cat([batch.pred_mask.flatten(start_dim=1).any(dim=1) for batch in batches])
    assert float(flagged[~truth].float().mean()) <= TARGET_FPR + 0.1
    assert float(flagged[truth].float().mean()) >= 0.8


def raw_validation_scores(model, datamodule):
    """Image scores ``(N,)`` of the validation split, before post-processing."""
    model.eval()
    with torch.no_grad():
        return torch.cat(
            [model.model(model.pre_processor(batch.image)).pred_score for batch in datamodule.val_dataloader()]
        )


def test_anomalib_default_on_the_same_split_takes_the_highest_good_score(
    fitted, good_only_validation, caplog, tmp_path
):
    """anomalib's F1 threshold, with no defect to find, falls back to the highest good validation score.

    Its false-positive rate is then whatever the split's size makes it (about ``1 / (N + 1)``), and cannot be
    chosen. ``threshold="f1"`` says so in a warning.
    """
    model, _ = fitted
    original = model.post_processor
    try:
        model.post_processor = CflowPlusPostProcessor(threshold="f1")
        with caplog.at_level(logging.WARNING):
            fresh_engine(tmp_path).validate(model, datamodule=good_only_validation)
        assert "holds no defective image" in caplog.text
        plain = PostProcessor()
        model.post_processor = plain
        engine = fresh_engine(tmp_path)
        engine.validate(model, datamodule=good_only_validation)
        scores = raw_validation_scores(model, good_only_validation)
        torch.testing.assert_close(plain.image_threshold, scores.max())
        assert float(original.image_threshold) < float(scores.max())  # the 95% quantile lies below the max
    finally:
        model.post_processor = original


def test_normal_fpr_sets_the_false_positive_rate(fitted, good_only_validation, tmp_path):
    """A higher target rate lowers the threshold: more good images flagged, in proportion."""
    model, _ = fitted
    original = model.post_processor
    try:
        model.post_processor = CflowPlusPostProcessor(threshold="normal", normal_fpr=0.3)
        engine = fresh_engine(tmp_path)
        engine.validate(model, datamodule=good_only_validation)
        scores = raw_validation_scores(model, good_only_validation)
        torch.testing.assert_close(model.post_processor.image_threshold, torch.quantile(scores, 0.7))
        predicted, truth = labels_on_test(model, engine, good_only_validation)
        _, fpr = f1_and_fpr(predicted, truth)
        assert 0.1 <= fpr <= 0.55, fpr  # 20 good test images, a threshold from 12 others
        assert bool(predicted[truth].all())
    finally:
        model.post_processor = original


def test_normal_thresholds_travel_in_checkpoint_and_openvino(fitted, good_only_validation, tmp_path):
    model, engine = fitted
    checkpoint = tmp_path / "model.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    restored = CflowPlus.load_from_checkpoint(checkpoint)
    assert restored.post_processor.threshold == "normal"
    assert restored.post_processor.normal_fpr == TARGET_FPR
    torch.testing.assert_close(restored.post_processor.image_threshold, model.post_processor.image_threshold)
    torch.testing.assert_close(restored.post_processor.pixel_threshold, model.post_processor.pixel_threshold)

    batch = next(iter(good_only_validation.test_dataloader()))
    path = engine.export(model, ExportType.OPENVINO, export_root=tmp_path, input_size=tuple(batch.image.shape[-2:]))
    compiled = ov.Core().compile_model(path, "CPU", F32)
    outputs = compiled(batch.image.numpy())
    exported_labels = torch.from_numpy(outputs[compiled.output("pred_label")]).flatten().bool()
    model.eval()
    with torch.no_grad():
        expected = model(batch.image)
    scores = expected.pred_score.flatten()
    off_threshold = (scores - 0.5).abs() > 1e-4
    assert expected.pred_label.any() and not expected.pred_label.all()
    assert torch.equal(exported_labels[off_threshold], expected.pred_label.flatten().bool()[off_threshold])
