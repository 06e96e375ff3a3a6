"""Lightning DDP on two CPU processes (gloo) through anomalib's CLI."""

import json

import pytest

from .cli import ANOMALIB, metrics, run

pytestmark = pytest.mark.slow


def test_cli_ddp_on_two_cpu_processes_keeps_decoders_in_sync(tiny_dataset, tmp_path, trained_run):
    probe = tmp_path / "probe"
    output = run(
        ANOMALIB, "train", "--model", "CflowPlus",
        "--data", "anomalib.data.MVTecAD", "--data.root", str(tiny_dataset), "--data.category", "brick",
        "--data.train_batch_size", "4", "--data.eval_batch_size", "8", "--data.num_workers", "0",
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.max_epochs", "2", "--trainer.callbacks+=tests.integration.ddp_probe.DecoderFingerprint",
        "--default_root_dir", str(tmp_path), "--seed_everything", "42",
        env={"DDP_PROBE_DIR": str(probe), "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[2])},
    )  # fmt: skip
    ranks = [json.loads((probe / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [record["world_size"] for record in ranks] == [2, 2]
    # each process trained on its own half of the 16 training images ...
    assert [record["images_seen"] for record in ranks] == [16, 16]  # 2 epochs x 8 images
    # ... and yet, with gradients averaged every step, both hold the same decoders and calibration
    assert ranks[0]["decoder_sum"] == ranks[1]["decoder_sum"]
    assert ranks[0]["decoder_norm"] == ranks[1]["decoder_norm"]
    assert ranks[0]["layer_max"] == ranks[1]["layer_max"]
    assert ranks[0]["layer_mean"] == ranks[1]["layer_mean"]
    assert ranks[0]["skipped_steps"] == 0
    # quality matches a single-process run of the same length
    tested = metrics(output)
    assert tested["image_AUROC"] >= trained_run.metrics["image_AUROC"] - 0.05, tested
    assert tested["pixel_AUROC"] >= trained_run.metrics["pixel_AUROC"] - 0.03, tested
