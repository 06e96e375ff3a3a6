"""anomalib's tiler with CflowPlus: ``TilerConfigurationCallback`` trains and scores on tiles, maps come out whole.

The tiny dataset's images are resized to 256 px and cut into four 128-px tiles. The tiled graph also exports:
at a fixed input size the tiler's stitching loop is unrolled into a static graph.
"""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from anomalib.callbacks import TilerConfigurationCallback
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from anomalib_cflow_plus import CflowPlus

from ..helpers import tiny_datamodule

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["image", "tile"])
def tiled_run(request, tiny_dataset, tmp_path_factory):
    seed_everything(42)
    datamodule = tiny_datamodule(tiny_dataset)
    model = CflowPlus(tile_condition=request.param)
    engine = Engine(
        max_epochs=1,
        default_root_dir=tmp_path_factory.mktemp("tiled"),
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[TilerConfigurationCallback(enable=True, tile_size=128, stride=128)],
    )
    engine.fit(model, datamodule=datamodule)
    metrics = engine.test(model, datamodule=datamodule)[0]
    return model, engine, datamodule, metrics


def test_tiled_model_trains_on_tiles_and_maps_whole_images(tiled_run):
    model, engine, datamodule, metrics = tiled_run
    assert model.model.tiler is not None and model.model.tiler.tile_size_h == 128
    assert metrics["image_AUROC"] >= 0.9, metrics
    assert metrics["pixel_AUROC"] >= 0.9, metrics
    batch = engine.predict(model, dataloaders=datamodule.test_dataloader())[0]
    assert tuple(batch.anomaly_map.shape[-2:]) == (256, 256)


def test_tiled_model_exports_to_onnx(tiled_run, tmp_path):
    model, engine, datamodule, _ = tiled_run
    if model.model.tile_condition != "image":
        pytest.skip("one export suffices: tests/unit/test_torch_model.py checks both conditions' stitching")
    batch = next(iter(datamodule.test_dataloader()))
    model.eval()
    with torch.no_grad():
        expected = model(batch.image)
    path = engine.export(model, ExportType.ONNX, export_root=tmp_path, input_size=tuple(batch.image.shape[-2:]))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    scores, anomaly_map = session.run(["pred_score", "anomaly_map"], {"input": batch.image.numpy()})
    np.testing.assert_allclose(scores.flatten(), expected.pred_score.numpy(), atol=1e-4)
    np.testing.assert_allclose(anomaly_map, expected.anomaly_map.numpy(), atol=1e-3)
