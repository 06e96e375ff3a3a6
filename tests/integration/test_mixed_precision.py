"""CflowPlus trains under Lightning's mixed precision and scores as the float32 run does, exports included.

``bf16-mixed`` is Lightning's CPU mixed precision; ``16-mixed`` (float16 autocast with a gradient scaler) is what
GPU users set first, and Lightning maps it to ``bf16-mixed`` on a CPU, so it is passed here as the precision plugin
itself. Both runs mirror the session's float32 run (``trained_run``: same seed, data and epochs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov
import pytest
import torch
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from lightning.pytorch.plugins.precision import MixedPrecision

from anomalib_cflow_plus import CflowPlus

from ..helpers import tiny_datamodule

pytestmark = pytest.mark.slow

F32 = {"INFERENCE_PRECISION_HINT": "f32"}
# Scores are in [0, 1] after anomalib's normalization; the mixed-precision runs' decoders differ from the float32
# run's only by the rounding of their training products (measured: at most 1.3e-3 here).
SCORE_TOLERANCE = 5e-3


def scores_of(engine: Engine, model: CflowPlus, datamodule) -> torch.Tensor:
    """Normalized image scores of the test split, in order."""
    batches = engine.predict(model, datamodule=datamodule, return_predictions=True)
    return torch.cat([batch.pred_score.flatten() for batch in batches])


@pytest.fixture(scope="module")
def float32_scores(trained_run, tiny_dataset) -> torch.Tensor:
    return scores_of(trained_run.engine, trained_run.model, tiny_datamodule(tiny_dataset))


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_a_mixed_precision_fit_scores_as_the_float32_fit(
    precision: str, trained_run, float32_scores: torch.Tensor, tiny_dataset: Path, tmp_path: Path
) -> None:
    seed_everything(42)
    datamodule = tiny_datamodule(tiny_dataset)
    model = CflowPlus()
    settings = {"plugins": [MixedPrecision("16-mixed", "cpu")]} if precision == "16-mixed" else {"precision": precision}
    engine = Engine(max_epochs=2, default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False, **settings)
    engine.fit(model, datamodule=datamodule)
    assert isinstance(engine.trainer.precision_plugin, MixedPrecision)
    assert engine.trainer.precision_plugin.precision == precision
    assert model.decoder_training.skipped_steps == 0
    assert all(bool(torch.isfinite(parameter).all()) for parameter in model.model.decoders.parameters())
    assert all(parameter.dtype == torch.float32 for parameter in model.model.parameters())
    calibration = model.model.anomaly_map.state_dict()
    assert all(value.dtype == torch.float32 for value in calibration.values() if value.is_floating_point())
    assert model.post_processor.image_threshold.dtype == torch.float32

    metrics = engine.test(model, datamodule=datamodule)[0]
    assert abs(metrics["image_AUROC"] - trained_run.metrics["image_AUROC"]) <= 0.01
    assert abs(metrics["pixel_AUROC"] - trained_run.metrics["pixel_AUROC"]) <= 0.01
    scores = scores_of(engine, model, datamodule)
    assert scores.dtype == torch.float32
    difference = (scores - float32_scores).abs().max().item()
    assert 0 < difference <= SCORE_TOLERANCE  # not zero: the decoders did train in reduced precision

    # The exported model is the float32 model, so it scores as the mixed-precision run's own predictions do.
    images = next(iter(datamodule.test_dataloader())).image[:4]
    path = model.to_openvino(export_root=tmp_path / "export", input_size=tuple(images.shape[-2:]))
    compiled = ov.Core().compile_model(ov.Core().read_model(path), "CPU", F32)
    model.eval()
    with torch.no_grad():
        expected = model(images)  # pre-processing, the model and anomalib's normalization, as exported
    outputs = compiled(images.numpy())
    np.testing.assert_allclose(outputs["pred_score"], expected.pred_score.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(outputs["anomaly_map"], expected.anomaly_map.numpy(), atol=1e-3)
