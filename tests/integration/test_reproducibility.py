"""Seeded CPU training is reproducible: two runs agree, and so does an interrupted run resumed from its checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.callbacks.checkpoint import ModelCheckpoint
from lightning.pytorch import Callback, seed_everything

from ..helpers import InterruptAtEpoch, SimulatedCrashError, tiny_datamodule

pytestmark = pytest.mark.slow

EPOCHS = 2


def fit(root: Path, dataset: Path, callbacks: list[Callback], ckpt_path: Path | None = None):
    """Seed, build a fresh model and fit it for EPOCHS on the tiny dataset (as a fresh process would)."""
    from anomalib.engine import Engine

    from anomalib_cflow_plus import CflowPlus

    seed_everything(7)
    model = CflowPlus(backbone="efficientnet_lite0")
    datamodule = tiny_datamodule(dataset)
    engine = Engine(
        max_epochs=EPOCHS, default_root_dir=root, accelerator="cpu", devices=1, logger=False, callbacks=callbacks
    )
    engine.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return model, datamodule


def scores(model, datamodule) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        results = [model(batch.image) for batch in datamodule.test_dataloader()]
    return torch.cat([r.pred_score for r in results]), torch.cat([r.anomaly_map for r in results])


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory):
    """An uninterrupted seeded run and its test scores."""
    model, datamodule = fit(tmp_path_factory.mktemp("reference"), tiny_dataset, [])
    return model, scores(model, datamodule)


def test_two_seeded_runs_give_identical_scores(reference, tiny_dataset, tmp_path):
    model, datamodule = fit(tmp_path, tiny_dataset, [])
    score, anomaly_map = scores(model, datamodule)
    torch.testing.assert_close(score, reference[1][0], atol=0, rtol=0)
    torch.testing.assert_close(anomaly_map, reference[1][1], atol=0, rtol=0)


def test_interrupted_training_resumes_to_the_same_result(reference, tiny_dataset, tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    with pytest.raises(SimulatedCrashError):
        fit(tmp_path / "first", tiny_dataset, [checkpoints, InterruptAtEpoch(1)])
    last = tmp_path / "ckpt" / "epoch=0.ckpt"
    assert last.is_file()
    model, datamodule = fit(tmp_path / "resumed", tiny_dataset, [], ckpt_path=last)
    for (name, value), expected in zip(
        model.model.decoders.state_dict().items(), reference[0].model.decoders.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(value, expected, atol=0, rtol=0, msg=name)
    score, anomaly_map = scores(model, datamodule)
    torch.testing.assert_close(score, reference[1][0], atol=0, rtol=0)
    torch.testing.assert_close(anomaly_map, reference[1][1], atol=0, rtol=0)
