"""End to end through anomalib's CLI: train, test from the checkpoint, export and predict."""

import pytest

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

    run(ANOMALIB, "export", "--model", "CflowPlus", "--export_type", "openvino", "--ckpt_path", str(checkpoint),
        "--default_root_dir", str(tmp_path / "export"))  # fmt: skip
    assert (tmp_path / "export" / "weights" / "openvino" / "model.xml").is_file()

    predicted = run(
        ANOMALIB, "predict", "--model", "CflowPlus", "--ckpt_path", str(checkpoint),
        "--data", str(tiny_dataset / "brick" / "test" / "scratch"), "--default_root_dir", str(tmp_path / "predict"),
    )  # fmt: skip
    assert "Traceback" not in predicted
    assert len(list((tmp_path / "predict").rglob("*.png"))) == 3
