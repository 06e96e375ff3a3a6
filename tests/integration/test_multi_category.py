"""One CflowPlus on several part types through anomalib's Engine: per-type metrics, resume, OpenVINO parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov
import pytest
import torch

F32 = {"INFERENCE_PRECISION_HINT": "f32"}


@pytest.fixture(scope="module")
def two_types(tmp_path_factory: pytest.TempPathFactory):
    """CflowPlus fitted for one epoch on two demo textures (brick, grass) joined by MultiCategory, then tested."""
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_cflow_plus import CflowPlus
    from anomalib_cflow_plus.data import MultiCategory, generate_demo_dataset

    root = generate_demo_dataset(
        tmp_path_factory.mktemp("types"), textures=("brick", "grass"), image_size=64, n_train=8, n_test_good=3,
        n_test_defect=2, seed=0,
    )  # fmt: skip
    children = [MVTecAD(root=root, category=name, num_workers=0) for name in ("brick", "grass")]
    datamodule = MultiCategory(children, train_batch_size=8, eval_batch_size=8, num_workers=0)
    seed_everything(0)
    model = CflowPlus(
        backbone="efficientnet_lite0", coupling_blocks=2, condition_vector=16, fiber_batch_size=256,
        pre_processor=CflowPlus.configure_pre_processor((64, 64)), visualizer=False,
    )  # fmt: skip
    run_dir = tmp_path_factory.mktemp("types_run")
    engine = Engine(max_epochs=1, default_root_dir=run_dir, accelerator="cpu", devices=1, logger=False)
    engine.fit(model=model, datamodule=datamodule)
    (results,) = engine.test(model=model, datamodule=datamodule, verbose=False)
    return model, datamodule, engine, results


def test_the_model_takes_the_datamodules_types_and_reports_metrics_per_type(two_types):
    model, datamodule, _, results = two_types
    assert model.model.part_types.names == datamodule.part_types == ["brick", "grass"]
    for metric in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO"):
        assert {metric, f"{metric}/brick", f"{metric}/grass"} <= set(results)
    # the overall AUROC is not the mean of the per-type ones: each type's is computed on its own images
    assert 0.0 <= results["image_AUROC/brick"] <= 1.0 and 0.0 <= results["image_AUROC/grass"] <= 1.0


def test_the_checkpoint_restores_the_types_into_a_fresh_model(two_types, tmp_path: Path):
    from anomalib_cflow_plus import CflowPlus

    model, datamodule, engine, _ = two_types
    checkpoint = tmp_path / "types.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    restored = CflowPlus.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    assert restored.model.part_types.names == ["brick", "grass"]
    images = next(iter(datamodule.test_dataloader())).image
    with torch.no_grad():
        torch.testing.assert_close(restored(images).pred_score, model.eval()(images).pred_score)


def test_the_exported_model_scores_a_mixed_batch_as_torch_does(two_types, tmp_path: Path):
    model, datamodule, _, _ = two_types
    test_data = datamodule.test_data
    batch = test_data.collate_fn([test_data[index] for index in (0, len(test_data) - 1, 1, len(test_data) - 2)])
    assert batch.part_type.tolist() == [0, 1, 0, 1]  # both types in one batch
    images = model.pre_processor.transform(batch.image)  # the exported graph resizes too: same size in, same out
    model.eval()
    with torch.no_grad():
        expected = model(images)
    path = model.to_openvino(export_root=tmp_path, input_size=(64, 64))
    outputs = ov.Core().compile_model(ov.Core().read_model(path), "CPU", F32)(images.numpy())
    np.testing.assert_allclose(outputs["pred_score"], expected.pred_score.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(outputs["anomaly_map"], expected.anomaly_map.numpy(), atol=1e-4, rtol=1e-4)
