"""Non-square inputs, end to end: a long part at 100 x 250 px, not a multiple of the encoder's stride.

Trains on the demo generator's non-square option (thin scratches and holes), then checks the maps' shape,
image AUROC, and that ONNX and OpenVINO exports at that size answer as the torch model does.
"""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.deploy import ExportType, OpenVINOInferencer
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from torchmetrics.classification import BinaryAUROC

from anomalib_cflow_plus import CflowPlus
from anomalib_cflow_plus.data import generate_demo_dataset

pytestmark = pytest.mark.slow

IMAGE_SIZE = (96, 240)  # what the demo generator writes: 2:5, a long part
MODEL_SIZE = (100, 250)  # what the pre-processor resizes to: neither side a multiple of 32
F32 = {"INFERENCE_PRECISION_HINT": "f32"}


@pytest.fixture(scope="module")
def long_parts(tmp_path_factory):
    root = generate_demo_dataset(
        tmp_path_factory.mktemp("long_demo"),
        textures=("brick",),
        image_size=IMAGE_SIZE,
        n_train=16,
        n_test_good=6,
        n_test_defect=4,
        defects=("scratch", "hole"),
    )
    return MVTecAD(root=root, category="brick", train_batch_size=8, eval_batch_size=8, num_workers=0)


@pytest.fixture(scope="module")
def fitted(long_parts, tmp_path_factory):
    seed_everything(42)
    model = CflowPlus(pre_processor=CflowPlus.configure_pre_processor(image_size=MODEL_SIZE))
    engine = Engine(
        max_epochs=2, default_root_dir=tmp_path_factory.mktemp("run"), accelerator="cpu", devices=1, logger=False
    )
    engine.fit(model, datamodule=long_parts)
    return model, engine


@pytest.fixture(scope="module")
def raw_test_images(long_parts):
    """Test images at the generator's size, before any pre-processing, and their labels."""
    dataset = MVTecAD(root=long_parts.root, category="brick", eval_batch_size=32, num_workers=0)
    dataset.setup("test")
    batch = next(iter(dataset.test_dataloader()))
    assert tuple(batch.image.shape[-2:]) == IMAGE_SIZE
    return batch.image, batch.gt_label


def test_maps_keep_the_aspect_ratio_and_find_defects(fitted, long_parts):
    model, engine = fitted
    metrics = engine.test(model, datamodule=long_parts)[0]
    assert metrics["image_AUROC"] >= 0.9, metrics
    assert metrics["pixel_AUROC"] >= 0.9, metrics
    batches = engine.predict(model, dataloaders=long_parts.test_dataloader())
    for batch in batches:
        assert tuple(batch.anomaly_map.shape[-2:]) == MODEL_SIZE
        assert tuple(batch.image.shape[-2:]) == MODEL_SIZE


def test_single_images_score_as_in_a_batch(fitted, raw_test_images):
    model, _ = fitted
    images, labels = raw_test_images
    model.eval()
    with torch.no_grad():
        batch = model(images)
        singles = torch.cat([model(image[None]).pred_score for image in images[:4]])
    torch.testing.assert_close(singles, batch.pred_score[:4], atol=1e-5, rtol=1e-5)
    assert tuple(batch.anomaly_map.shape[-2:]) == MODEL_SIZE
    assert float(BinaryAUROC()(batch.pred_score, labels.int())) >= 0.9


def test_exports_at_the_long_size_match_torch(fitted, raw_test_images, tmp_path):
    model, engine = fitted
    images, _ = raw_test_images
    model.eval()
    with torch.no_grad():
        expected = model(images)
    onnx_path = engine.export(model, ExportType.ONNX, export_root=tmp_path / "onnx", input_size=IMAGE_SIZE)
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {"input": images.numpy()}), strict=True))
    np.testing.assert_allclose(outputs["pred_score"].flatten(), expected.pred_score.numpy(), atol=1e-4)
    assert outputs["anomaly_map"].shape[-2:] == MODEL_SIZE
    np.testing.assert_allclose(outputs["anomaly_map"].squeeze(1), expected.anomaly_map.squeeze(1).numpy(), atol=1e-3)

    model.__dict__["to_onnx"] = lambda *args, **kwargs: onnx_path  # OpenVINO goes through the same ONNX file
    try:
        ov_path = engine.export(model, ExportType.OPENVINO, export_root=tmp_path / "ov", input_size=IMAGE_SIZE)
    finally:
        del model.__dict__["to_onnx"]
    inferencer = OpenVINOInferencer(path=ov_path, device="CPU", config=F32)
    for index in (0, len(images) - 1):
        prediction = inferencer.predict(images[index])
        assert prediction.anomaly_map.shape[-2:] == MODEL_SIZE
        assert abs(float(prediction.pred_score.flatten()[0]) - float(expected.pred_score[index])) <= 1e-4
        difference = np.abs(prediction.anomaly_map.squeeze() - expected.anomaly_map[index].squeeze().numpy())
        assert difference.max() <= 1e-3
