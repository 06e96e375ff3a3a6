"""End to end through anomalib's CLI: train, test from the checkpoint, export (INT8) and predict."""

import openvino as ov
import pytest

from anomalib_cflow_plus.quantization import fp32_tail_names

from .cli import ANOMALIB, metrics, run

pytestmark = pytest.mark.slow


def test_cli_train_test_export_predict(tiny_dataset, tmp_path):
    data = [
        "--data", "anomalib.data.MVTecAD", "--data.root", str(tiny_dataset), "--data.category", "brick",
        "--data.train_batch_size", "8", "--data.eval_batch_size", "8", "--data.num_workers", "0",
    ]  # fmt: skip
    trained = metrics(
        run(ANOMALIB, "train", "--model", "CflowPlus", *data, "--trainer.max_epochs", "2",
            "--default_root_dir", str(tmp_path), "--seed_everything", "42"),
    )  # fmt: skip
    assert trained["image_AUROC"] >= 0.9, trained
    assert {"pixel_AUROC", "pixel_AUPRO", "image_F1Score", "pixel_F1Score"} <= set(trained)
    run_dir = tmp_path / "CflowPlus" / "MVTecAD" / "brick" / "latest"
    checkpoint = run_dir / "weights" / "lightning" / "model.ckpt"
    assert checkpoint.is_file()
    assert any((run_dir / "images").rglob("*.png")), "anomalib's visualizer wrote no images"

    tested = metrics(
        run(ANOMALIB, "test", "--model", "CflowPlus", *data, "--ckpt_path", str(checkpoint),
            "--default_root_dir", str(tmp_path / "test")),
    )  # fmt: skip
    for name in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO"):
        assert tested[name] == pytest.approx(trained[name], abs=1e-6), name

    # INT8 through the CLI: anomalib hands the --data datamodule to CflowPlus's quantization hook.
    run(ANOMALIB, "export", "--model", "CflowPlus", "--export_type", "openvino", "--ckpt_path", str(checkpoint),
        "--compression_type", "INT8_PTQ", *data, "--default_root_dir", str(tmp_path / "export"))  # fmt: skip
    exported = ov.Core().read_model(tmp_path / "export" / "weights" / "openvino" / "model.xml")
    quantizers = {op.get_friendly_name() for op in exported.get_ops() if op.get_type_name() == "FakeQuantize"}
    assert quantizers, "INT8_PTQ exported no quantizer"
    assert not quantizers & set(fp32_tail_names(exported)), "a quantizer sits in the scoring tail"

    run(
        ANOMALIB, "predict", "--model", "CflowPlus", "--ckpt_path", str(checkpoint),
        "--data", str(tiny_dataset / "brick" / "test" / "scratch"), "--default_root_dir", str(tmp_path / "predict"),
    )  # fmt: skip
    assert len(list((tmp_path / "predict").rglob("*.png"))) == 3
