"""Reliability as a CLI user meets it: seeded and resumed runs, bad frames in prediction, errors a person can read."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from anomalib_cflow_plus.data import generate_demo_dataset

from .cli import ANOMALIB, metrics, run, run_unchecked

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PREDICT_OPENVINO = REPO / "scripts" / "predict_openvino.py"
SEED = ["--seed_everything", "42"]
MODEL = ["--model", "CflowPlus", "--model.backbone", "efficientnet_lite0", "--model.coupling_blocks", "2"]
LAST_LINES = 6


def data_args(root: Path) -> list[str]:
    return [
        "--data", "anomalib.data.MVTecAD", "--data.root", str(root), "--data.category", "brick",
        "--data.train_batch_size", "4", "--data.eval_batch_size", "4", "--data.num_workers", "0",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo_dataset(
        tmp_path_factory.mktemp("reliability"), textures=("brick",), image_size=64, n_train=8, n_test_good=3,
        n_test_defect=2, defects=("hole",),
    )  # fmt: skip


def train(dataset: Path, root: Path, *extra: str, check: bool = True) -> tuple[dict[str, float], Path, int, str]:
    """``anomalib train`` for 2 seeded epochs; return the printed metrics, the checkpoint, the status, the output."""
    args = [ANOMALIB, "train", *MODEL, *data_args(dataset), "--trainer.max_epochs", "2", "--default_root_dir",
            str(root), *SEED, *extra]  # fmt: skip
    if check:
        output = run(*args)
        status = 0
    else:
        status, output, _ = run_unchecked(*args, env={"PYTHONPATH": str(REPO)})
    checkpoint = root / "CflowPlus" / "MVTecAD" / "brick" / "latest" / "weights" / "lightning" / "model.ckpt"
    return metrics(output), checkpoint, status, output


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


def assert_same_weights(first: Path, second: Path) -> None:
    one, other = weights(first), weights(second)
    assert one.keys() == other.keys()
    for name in one:
        torch.testing.assert_close(one[name], other[name], rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def reference(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, float], Path, str]:
    printed, checkpoint, _, output = train(dataset, tmp_path_factory.mktemp("reference"))
    return printed, checkpoint, output


def test_seeded_cli_runs_are_reproducible(reference, dataset: Path, tmp_path: Path) -> None:
    printed, checkpoint, output = reference
    assert "Seed set to 42" in output
    assert "will override existing callbacks" not in output
    assert "Non-trainable params: 3.0 M" in output  # the frozen encoder
    again, again_checkpoint, _, _ = train(dataset, tmp_path)
    assert again == printed and {"image_AUROC", "pixel_AUPRO"} <= set(printed)
    assert_same_weights(checkpoint, again_checkpoint)


def test_resumed_cli_run_tests_the_resumed_model(reference, dataset: Path, tmp_path: Path) -> None:
    _, _, status, output = train(
        dataset, tmp_path / "first", "--trainer.callbacks+=tests.helpers.InterruptAtEpoch", check=False
    )
    assert status != 0 and "SimulatedCrashError" in output
    interrupted = tmp_path / "epoch0.ckpt"
    shutil.copy(tmp_path / "first" / "CflowPlus" / "MVTecAD" / "brick" / "latest" / "weights" / "lightning" /
                "model.ckpt", interrupted)  # fmt: skip
    epoch0 = metrics(run(ANOMALIB, "test", *MODEL, *data_args(dataset), "--ckpt_path", str(interrupted),
                         "--default_root_dir", str(tmp_path / "test0"), *SEED))  # fmt: skip
    resumed, resumed_checkpoint, _, _ = train(dataset, tmp_path / "resumed", "--ckpt_path", str(interrupted))
    assert resumed == reference[0]
    assert resumed != epoch0  # what the resumed run printed before: the checkpoint it resumed from
    assert_same_weights(resumed_checkpoint, reference[1])


@pytest.fixture(scope="module")
def frames(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two good frames and a truncated one."""
    folder = tmp_path_factory.mktemp("frames")
    for name in ("000.png", "001.png"):
        shutil.copy(dataset / "brick" / "test" / "good" / name, folder / name)
    data = (dataset / "brick" / "test" / "hole" / "000.png").read_bytes()
    (folder / "002_cut.png").write_bytes(data[: len(data) // 2])
    return folder


def test_prediction_scores_every_readable_frame(reference, frames: Path, tmp_path: Path) -> None:
    output = run(ANOMALIB, "predict", *MODEL, "--ckpt_path", str(reference[1]), "--data", str(frames),
                 "--default_root_dir", str(tmp_path))  # fmt: skip
    written = sorted(path.name for path in tmp_path.rglob("*.png"))
    assert written == ["000.png", "001.png"]
    assert "Left out 1 of 3 images" in output and str(frames / "002_cut.png") in output


def test_openvino_prediction_scores_every_readable_frame(reference, frames: Path, tmp_path: Path) -> None:
    exported = run(ANOMALIB, "export", *MODEL, "--export_type", "openvino", "--ckpt_path", str(reference[1]),
                   "--default_root_dir", str(tmp_path / "export"))  # fmt: skip
    assert "Skipping constant folding" not in exported
    assert len(exported.splitlines()) < 60, f"{len(exported.splitlines())} lines of export output"
    model = tmp_path / "export" / "weights" / "openvino" / "model.xml"
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    status, output, _ = run_unchecked(
        sys.executable, str(PREDICT_OPENVINO), "--model", str(model), "--image", str(frames), "--output",
        str(tmp_path / "out"), "--f32", cwd=workdir, env=env,
    )  # fmt: skip
    assert status == 0, output
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["000.png", "001.png"]
    assert f"{frames / '002_cut.png'}: skipped, cannot be read" in output and "Scored 2 of 3 images" in output
    assert list(workdir.iterdir()) == []  # no ./openvino_cache
    assert any((tmp_path / "cache" / "anomalib_cflow_plus" / "openvino").iterdir())

    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    shutil.copy(frames / "002_cut.png", only_bad)
    status, output, _ = run_unchecked(
        sys.executable, str(PREDICT_OPENVINO), "--model", str(model), "--image", str(only_bad), "--output",
        str(tmp_path / "out2"), cwd=workdir, env=env,
    )  # fmt: skip
    assert status == 1 and "Scored 0 of 1 images" in output


def last_lines(output: str) -> str:
    return "\n".join(output.strip().splitlines()[-LAST_LINES:])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--model.lr", "-1"], "lr must be > 0, got -1.0."),
        (["--model.condition_vector", "130"], "condition_vector must be a positive multiple of 4, got 130."),
        (["--model.layers", "[blocks.99]"], "Invalid layers ['blocks.99']"),
        (["--model.backbone", "resnt18"], "the closest are: resnet18"),
    ],
)
def test_a_bad_model_argument_ends_the_output_with_its_reason(
    dataset: Path, tmp_path: Path, arguments: list[str], message: str
) -> None:
    status, output, _ = run_unchecked(ANOMALIB, "train", *MODEL, *arguments, *data_args(dataset),
                                      "--default_root_dir", str(tmp_path))  # fmt: skip
    assert status != 0
    assert message in last_lines(output), output[-3000:]
    assert "Given value" not in output and "Union subtypes" not in output  # jsonargparse's noise


def broken_copy(dataset: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(dataset, root)
    return root


def test_an_unreadable_training_image_is_reported_once_at_the_end(dataset: Path, tmp_path: Path) -> None:
    root = broken_copy(dataset, tmp_path)
    image = root / "brick" / "train" / "good" / "003.png"
    image.write_bytes(image.read_bytes()[:200])
    status, output, _ = run_unchecked(ANOMALIB, "train", *MODEL, *data_args(root), "--default_root_dir",
                                      str(tmp_path / "run"))  # fmt: skip
    assert status != 0
    assert str(image) in last_lines(output) and "truncated" in last_lines(output)
    assert output.count("cannot be used; fix, replace or remove them") == 1
    assert "Traceback" not in output


def test_a_missing_mask_is_named(dataset: Path, tmp_path: Path) -> None:
    root = broken_copy(dataset, tmp_path)
    (root / "brick" / "ground_truth" / "hole" / "001_mask.png").unlink()
    status, output, _ = run_unchecked(ANOMALIB, "train", *MODEL, *data_args(root), "--default_root_dir",
                                      str(tmp_path / "run"))  # fmt: skip
    assert status != 0
    assert "MaskMismatchError" in output and str(root / "brick" / "test" / "hole" / "001.png") in last_lines(output)
    assert "Must have equal len keys" not in output
