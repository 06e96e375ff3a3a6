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
    images = batch.image  # the model (and its exported graph) pre-processes them
    model.eval()
    with torch.no_grad():
        expected = model(images)
    path = model.to_openvino(export_root=tmp_path, input_size=(64, 64))
    outputs = ov.Core().compile_model(ov.Core().read_model(path), "CPU", F32)(images.numpy())
    np.testing.assert_allclose(outputs["pred_score"], expected.pred_score.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(outputs["anomaly_map"], expected.anomaly_map.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_the_yaml_config_trains_one_model_on_two_cpu_processes(tmp_path: Path):
    """configs/multi_category.yaml through anomalib's CLI, DDP on two processes: both hold one model of every type."""
    import json

    from anomalib_cflow_plus.data import generate_demo_dataset

    from .cli import ANOMALIB, run

    root = generate_demo_dataset(
        tmp_path / "demo", textures=("brick", "grass", "gravel"), image_size=64, n_train=8, n_test_good=2,
        n_test_defect=2, seed=0,
    )  # fmt: skip
    config = Path(__file__).parents[2] / "configs" / "multi_category.yaml"
    local = tmp_path / "multi_category.yaml"
    local.write_text(config.read_text().replace("root: datasets/demo", f"root: {root}"))
    probe = tmp_path / "probe"
    output = run(
        ANOMALIB, "train", "--config", str(local), "--model.init_args.backbone", "efficientnet_lite0",
        "--model.init_args.coupling_blocks", "2", "--data.init_args.train_batch_size", "4",
        "--data.init_args.num_workers", "0", "--trainer.strategy", "ddp", "--trainer.devices", "2",
        "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--default_root_dir", str(tmp_path / "run"),
        "--trainer.callbacks+=tests.integration.ddp_probe.DecoderFingerprint",
        env={"DDP_PROBE_DIR": str(probe), "PYTHONPATH": str(Path(__file__).parents[2])},
    )  # fmt: skip
    ranks = [json.loads((probe / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [record["world_size"] for record in ranks] == [2, 2]
    assert ranks[0]["decoder_sum"] == ranks[1]["decoder_sum"]  # type vectors included
    assert ranks[0]["layer_max"] == ranks[1]["layer_max"] and len(ranks[0]["layer_max"]) == 3  # per type (3, L)
    assert ranks[0]["prototypes"] == ranks[1]["prototypes"]
    for name in ("brick", "grass", "gravel"):
        assert f"image_AUROC/{name}" in output
    folders = {path.name for path in (tmp_path / "run").rglob("images/*") if path.is_dir()}
    assert folders == {"brick", "grass", "gravel"}  # one folder of visualized images per type


def test_int8_quantizes_a_model_of_two_types_and_keeps_the_scoring_tail_in_fp32(two_types, tmp_path: Path):
    """INT8 PTQ of a model of two types, calibrated on the joined training images (anomalib's export path)."""
    from anomalib.deploy import CompressionType, ExportType

    from anomalib_cflow_plus.quantization import fp32_tail_names

    model, datamodule, engine, _ = two_types
    path = engine.export(
        model, ExportType.OPENVINO, export_root=tmp_path, input_size=(64, 64),
        compression_type=CompressionType.INT8_PTQ, datamodule=datamodule,
    )  # fmt: skip
    quantized = ov.Core().read_model(path)
    fake_quantizers = {op.get_friendly_name() for op in quantized.get_ops() if op.get_type_name() == "FakeQuantize"}
    assert len(fake_quantizers) >= 20
    assert not fake_quantizers & set(fp32_tail_names(quantized))
    test_data = datamodule.test_data
    batch = test_data.collate_fn([test_data[index] for index in range(len(test_data))])
    images = batch.image
    scores = ov.Core().compile_model(quantized, "CPU", F32)(images.numpy())["pred_score"]
    with torch.no_grad():
        expected = model.eval()(images).pred_score.numpy()
    # the types' mean image AUROC holds (a one-epoch model on 11 images per type: a loose bound)
    from sklearn.metrics import roc_auc_score

    aurocs = []
    for index in (0, 1):
        rows, labels = (batch.part_type == index).numpy(), batch.gt_label.numpy()
        aurocs.append((roc_auc_score(labels[rows], scores[rows]), roc_auc_score(labels[rows], expected[rows])))
    (int8, fp32) = np.mean(aurocs, axis=0)
    assert int8 >= fp32 - 0.1, aurocs
