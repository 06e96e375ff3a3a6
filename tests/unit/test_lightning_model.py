from types import SimpleNamespace

import pytest
import torch
from anomalib.post_processing import PostProcessor

from anomalib_cflow_plus import CflowPlus, CflowPlusPostProcessor, torch_model
from anomalib_cflow_plus.backbones import packaged_state_dict
from anomalib_cflow_plus.calibration import calibrate
from anomalib_cflow_plus.data import DataCheckCallback
from anomalib_cflow_plus.training import TRAINING_RECIPES


def test_paper_defaults_are_constructor_arguments():
    default = CflowPlus(backbone="efficientnet_lite0")  # the paper's decoders: P = 128, K = 8, alpha = 1.9
    decoder = default.model.decoders[0]
    assert len(decoder) == 1 + 8  # ActNorm + couplings
    assert {coupling.clamp_alpha for coupling in decoder[1:]} == {1.9}
    assert {coupling.subnet.condition_in.in_features for coupling in decoder[1:]} == {128}
    paper = CflowPlus(training_recipe="paper")
    assert (paper.fiber_batch_size, paper.lr) == (256, 2e-4)
    assert CflowPlus(training_recipe="paper", lr=1e-3).lr == 1e-3  # explicit values win over the recipe's
    model = CflowPlus(coupling_blocks=3, condition_vector=64)
    assert len(model.model.decoders[0]) == 1 + 3  # ActNorm + couplings
    assert model.hparams.coupling_blocks == 3
    narrow = CflowPlus(hidden_ratio=0.5)
    assert narrow.hparams.hidden_ratio == 0.5
    assert narrow.model.decoders[0][1].subnet.out.in_features == round(0.5 * 2 * (40 // 2 + 128))  # lite1 blocks.2
    assert CflowPlus().model.neighbourhood == 1  # the paper's one fiber at a time, by default
    context = CflowPlus(neighbourhood=3)
    assert (context.hparams.neighbourhood, context.model.neighbourhood) == (3, 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fiber_batch_size": 0}, "fiber_batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"warmup_fraction": 1.5}, "warmup_fraction"),
        ({"condition_vector": 130}, "multiple of 4"),
        ({"layers": ["blocks.9"]}, "Valid layers"),
        ({"training_recipe": "adamw"}, "training_recipe"),
        ({"fiber_batch_size": 10**6}, "at most 32768"),  # 32 images x 32x32 fibers at 256 px
        ({"max_skipped_steps": 0}, "max_skipped_steps"),
        ({"threshold": "otsu"}, "threshold must be one of"),
        ({"normal_fpr": 1.0}, "normal_fpr must lie in"),
    ],
)
def test_invalid_hyper_parameters_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CflowPlus(**kwargs)


def test_default_post_processor_takes_the_threshold_options(caplog):
    post_processor = CflowPlus(threshold="normal", normal_fpr=0.02).post_processor
    assert isinstance(post_processor, CflowPlusPostProcessor)
    assert (post_processor.threshold, post_processor.normal_fpr) == ("normal", 0.02)
    assert CflowPlus().post_processor.threshold == "auto"
    own = PostProcessor()
    assert CflowPlus(post_processor=own, threshold="normal").post_processor is own
    assert "they are ignored" in caplog.text


def test_construction_never_loads_weights(monkeypatch):
    # a hub-only backbone: construction (as when rebuilding from a checkpoint) must not touch the network
    import huggingface_hub
    import timm.models

    def no_network(*args, **kwargs):
        raise AssertionError("construction tried to load weights")

    for module, name in [(torch_model, "resolve_state_dict"), (huggingface_hub, "hf_hub_download"),
                         (timm.models, "load_pretrained"), (torch.hub, "load_state_dict_from_url")]:  # fmt: skip
        monkeypatch.setattr(module, name, no_network)
    model = CflowPlus(backbone="resnet18", layers=["layer1", "layer2", "layer3"])
    assert model.model.encoder.out_dims == [64, 128, 256]
    with pytest.raises(AssertionError, match="tried to load"):
        model.model.load_pretrained()  # the patch is where weights would come from


def test_the_encoder_is_frozen_from_construction():
    model = CflowPlus(backbone="efficientnet_lite0", coupling_blocks=1)
    assert not any(parameter.requires_grad for parameter in model.model.encoder.parameters())
    assert all(parameter.requires_grad for parameter in model.model.decoders.parameters())


def test_callbacks_the_trainer_holds_already_are_not_returned_again():
    model = CflowPlus(backbone="efficientnet_lite0", coupling_blocks=1)
    first = model.configure_callbacks()
    model._trainer = SimpleNamespace(callbacks=first)  # as after the fit of Engine.train, before its test
    assert model.configure_callbacks() == []
    model._trainer = SimpleNamespace(callbacks=[DataCheckCallback(workers=1)])  # the user's own
    again = model.configure_callbacks()
    assert len(again) == len(first) - 1
    assert not any(isinstance(callback, DataCheckCallback) for callback in again)


def test_cli_seed_redraws_the_decoders_of_a_fresh_fit(monkeypatch):
    from jsonargparse import ArgumentParser, Namespace
    from lightning.pytorch.cli import SaveConfigCallback
    from lightning.pytorch.trainer.states import TrainerFn

    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    weights = []
    for _ in range(2):
        model = CflowPlus(backbone="efficientnet_lite0", coupling_blocks=1)  # drawn unseeded, as the CLI does
        config = SaveConfigCallback(ArgumentParser(), Namespace(seed_everything=3))
        model._trainer = SimpleNamespace(
            callbacks=[config], state=SimpleNamespace(fn=TrainerFn.FITTING), datamodule=None
        )
        model.prepare_data()
        model.setup("fit")  # applied once per process
        weights.append(torch.cat([parameter.flatten() for parameter in model.model.decoders.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)


@pytest.mark.slow  # trains a model
def test_fit_keeps_encoder_frozen_and_calibrates(trained_run):
    model = trained_run.model
    reference = packaged_state_dict(model.backbone)
    encoder_state = model.model.feature_encoder.state_dict()
    for key in ("conv_stem.weight", "bn1.running_mean", "blocks.2.0.bn1.running_var"):
        torch.testing.assert_close(encoder_state[key], reference[key])  # pretrained, and unchanged by training
    calibration = model.model.anomaly_map
    assert bool(calibration.calibrated)
    # the stored constants are the statistics of the final decoders on the training images
    expected = calibration.layer_max.clone(), calibration.layer_std.clone()
    datamodule = trained_run.datamodule
    images = (model.pre_processor.transform(batch.image) for batch in datamodule.train_dataloader())
    calibrate(model.model, images, model.device)
    torch.testing.assert_close(calibration.layer_max, expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(calibration.layer_std, expected[1], atol=1e-5, rtol=0)


@pytest.mark.slow  # trains a model
def test_trained_model_detects_defects(trained_run):
    assert trained_run.metrics["image_AUROC"] >= 0.9
    assert trained_run.metrics["pixel_AUROC"] >= 0.9
    assert "pixel_AUPRO" in trained_run.metrics


@pytest.mark.slow  # trains a model
def test_checkpoint_round_trip_reproduces_scores(trained_run):
    restored = CflowPlus.load_from_checkpoint(trained_run.checkpoint).eval()
    original = trained_run.model.eval()
    images = next(iter(trained_run.datamodule.test_dataloader())).image
    with torch.no_grad():
        expected, actual = original(images), restored(images)
    torch.testing.assert_close(actual.pred_score, expected.pred_score, atol=0, rtol=0)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, atol=0, rtol=0)
    assert bool(restored.model.anomaly_map.calibrated)


def test_optimizer_trains_the_decoders_only():
    model = CflowPlus(coupling_blocks=2)
    optimizer = model.configure_optimizers()["optimizer"]
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.model.decoders.parameters()}
    assert optimizer.param_groups[0]["lr"] == pytest.approx(TRAINING_RECIPES["fast"].lr)


def _fit_with_nan_batches(dataset, root, nan_batches: set[int] | None, max_skipped_steps: int = 20):
    """Fit a small model for one epoch; the encoder returns NaN features for the listed batches (None: all)."""
    from anomalib.engine import Engine

    from ..helpers import tiny_datamodule

    model = CflowPlus(
        backbone="efficientnet_lite0",
        pre_processor=CflowPlus.configure_pre_processor((64, 64)),
        max_skipped_steps=max_skipped_steps,
        fiber_batch_size=64,  # several steps per batch of 8 images at 64 px (8 x 8 x 8 fibers in the first layer)
    )
    encode = model.model.encode
    calls = {"batch": -1}

    def poisoned_encode(images):
        features = encode(images)
        if model.model.training:  # training batches only, not calibration or validation
            calls["batch"] += 1
            if nan_batches is None or calls["batch"] in nan_batches:
                features[0].fill_(float("nan"))  # every fiber of the first layer
        return features

    model.model.encode = poisoned_encode
    engine = Engine(max_epochs=1, default_root_dir=root, accelerator="cpu", devices=1, logger=False)
    engine.fit(model, datamodule=tiny_datamodule(dataset))
    return model, engine


@pytest.mark.slow  # trains a model
def test_non_finite_steps_are_skipped_and_counted(tiny_dataset, tmp_path):
    model, engine = _fit_with_nan_batches(tiny_dataset, tmp_path, nan_batches={1})
    assert model.decoder_training.skipped_steps >= 1  # batch 1's steps all met a NaN loss
    assert engine.trainer.callback_metrics["skipped_steps"] == model.decoder_training.skipped_steps
    state = model.model.state_dict()
    tensors = [value for value in state.values() if isinstance(value, torch.Tensor)]  # not the part types' names
    assert all(bool(torch.isfinite(tensor).all()) for tensor in tensors if tensor.is_floating_point())
    assert bool(model.model.normalization_initialized)  # the clean batch 0 initialized the ActNorms
    checkpoint = torch.load(engine.trainer.checkpoint_callback.best_model_path, weights_only=False)
    saved = [v for v in checkpoint["state_dict"].values() if isinstance(v, torch.Tensor)]
    assert all(bool(torch.isfinite(v).all()) for v in saved if v.is_floating_point())


@pytest.mark.slow  # trains a model
def test_persistent_non_finite_steps_stop_training(tiny_dataset, tmp_path):
    with pytest.raises(FloatingPointError, match="3 optimizer steps in a row"):
        _fit_with_nan_batches(tiny_dataset, tmp_path, nan_batches=None, max_skipped_steps=3)


def test_checkpoint_with_nan_is_refused():
    model = CflowPlus(backbone="efficientnet_lite0", coupling_blocks=1)
    with torch.no_grad():
        model.model.decoders[0][1].subnet.out.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"decoders\.0\.module_list\.1\.subnet\.out\.weight"):
        model.on_save_checkpoint({})


def test_fiber_batch_check_counts_fibers_of_a_non_square_input():
    size = (64, 160)  # stride 8: 8 x 20 = 160 fibers per image, 5120 in a batch of 32
    pre_processor = CflowPlus.configure_pre_processor(image_size=size)
    assert CflowPlus(pre_processor=pre_processor, fiber_batch_size=5120).fiber_batch_size == 5120
    with pytest.raises(ValueError, match="at most 5120"):
        CflowPlus(pre_processor=CflowPlus.configure_pre_processor(image_size=size), fiber_batch_size=5121)


def test_an_uncalibrated_model_refuses_to_score():
    from anomalib_cflow_plus.errors import NotCalibratedError

    model = CflowPlus(backbone="efficientnet_lite0", coupling_blocks=1).eval()
    batch = SimpleNamespace(image=torch.rand(2, 3, 64, 64), update=lambda **fields: fields)
    with pytest.raises(NotCalibratedError, match=r"not been fitted.*ckpt_path"):
        model.validation_step(batch)  # and so testing and predicting, which anomalib runs through it
    layers = len(model.model.layers)
    model.model.anomaly_map.set_calibration(torch.zeros(layers), torch.zeros(layers), torch.ones(layers))
    with torch.no_grad():
        scored = model.validation_step(batch)
        scores = model(torch.rand(2, 3, 64, 64)).pred_score
    assert scored["pred_score"].shape == (2,) and scored["anomaly_map"].shape == (2, 1, 64, 64)
    assert scores.shape == (2,) and bool(torch.isfinite(scores).all())
