"""Training report: loss history and score histogram numbers, PNG files, checkpoint state, DDP gathering."""

from __future__ import annotations

import json
import multiprocessing
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from anomalib.data import ImageBatch, ImageItem
from anomalib.post_processing import PostProcessor
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from anomalib_cflow_plus.reporting import (
    BatchLoss,
    ScoredImage,
    TrainingReportCallback,
    batch_image_scores,
    batch_size_of,
    epoch_losses,
    gather_from_all_ranks,
    image_threshold,
    plot_score_histogram,
    plot_training_loss,
    unique_images,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.load()
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert min(image.size) >= 100
    assert pixels.std() > 10  # something is drawn, not a blank canvas


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------ numbers
def test_epoch_losses_are_batch_size_weighted_means():
    history = [
        BatchLoss(batch=1, epoch=0, loss=1.0, batch_size=3),
        BatchLoss(batch=2, epoch=0, loss=4.0, batch_size=1),
        BatchLoss(batch=3, epoch=1, loss=2.0, batch_size=2),
    ]
    assert epoch_losses(history) == [
        {"epoch": 0, "loss": pytest.approx(7.0 / 4), "first_batch": 1, "last_batch": 2},
        {"epoch": 1, "loss": pytest.approx(2.0), "first_batch": 3, "last_batch": 3},
    ]


def test_batch_size_of_anomalib_batch_tensor_and_tuple():
    batch = ImageBatch(image=torch.zeros(5, 3, 4, 4))
    assert batch_size_of(batch) == 5
    assert batch_size_of(torch.zeros(7, 2)) == 7
    assert batch_size_of([torch.zeros(4, 2), torch.zeros(4)]) == 4


def test_batch_image_scores_pairs_scores_with_labels_and_paths():
    batch = ImageBatch(
        image=torch.zeros(3, 3, 4, 4),
        gt_label=torch.tensor([0, 1, 1]),
        pred_score=torch.tensor([0.25, 0.5, 0.75]),
        image_path=["good/0.png", "hole/0.png", "stain/0.png"],
    )
    assert batch_image_scores(batch) == [
        {"image_path": "good/0.png", "gt_label": 0, "pred_score": 0.25, "part_type": None},
        {"image_path": "hole/0.png", "gt_label": 1, "pred_score": 0.5, "part_type": None},
        {"image_path": "stain/0.png", "gt_label": 1, "pred_score": 0.75, "part_type": None},
    ]
    unlabelled = ImageBatch(image=torch.zeros(1, 3, 4, 4), pred_score=torch.tensor([0.5]))
    assert batch_image_scores(unlabelled) == [
        {"image_path": None, "gt_label": None, "pred_score": 0.5, "part_type": None}
    ]
    assert batch_image_scores(ImageBatch(image=torch.zeros(1, 3, 4, 4))) == []


def test_batch_image_scores_keep_the_part_type_and_the_histogram_has_a_panel_per_type(tmp_path):
    from PIL import Image

    from anomalib_cflow_plus.data import PartTypeImageBatch

    batch = PartTypeImageBatch(
        image=torch.zeros(4, 3, 4, 4),
        gt_label=torch.tensor([0, 1, 0, 1]),
        pred_score=torch.tensor([0.1, 0.9, 0.2, 0.8]),
        part_type=torch.tensor([0, 0, 1, 1]),
    )
    scores = batch_image_scores(batch)
    assert [s["part_type"] for s in scores] == [0, 0, 1, 1]
    for record, name in zip(scores, ["screw", "screw", "tire", "tire"], strict=True):
        record["part_type"] = name
    figure_path = plot_score_histogram(scores, 0.5, "raw", tmp_path / "scores.png")
    one_type = plot_score_histogram(scores[:2], 0.5, "raw", tmp_path / "one.png")
    assert Image.open(figure_path).height > 1.5 * Image.open(one_type).height  # two panels, stacked


def test_unique_images_drops_repeated_paths_keeps_pathless():
    scores = [
        ScoredImage(image_path="a", gt_label=0, pred_score=0.1),
        ScoredImage(image_path="b", gt_label=1, pred_score=0.9),
        ScoredImage(image_path="a", gt_label=0, pred_score=0.1),
        ScoredImage(image_path=None, gt_label=0, pred_score=0.2),
        ScoredImage(image_path=None, gt_label=0, pred_score=0.2),
    ]
    assert [s["image_path"] for s in unique_images(scores)] == ["a", "b", None, None]


def test_image_threshold_follows_the_post_processor():
    normalizing = PostProcessor(image_sensitivity=0.3)
    assert image_threshold(SimpleNamespace(post_processor=normalizing)) == (pytest.approx(0.7), "normalized")

    raw = PostProcessor(enable_normalization=False)
    assert image_threshold(SimpleNamespace(post_processor=raw)) == (None, "raw")  # not learned yet
    raw._image_threshold.fill_(3.5)
    assert image_threshold(SimpleNamespace(post_processor=raw)) == (3.5, "raw")

    assert image_threshold(SimpleNamespace(post_processor=PostProcessor(enable_thresholding=False)))[0] is None
    assert image_threshold(SimpleNamespace(post_processor=None)) == (None, "raw")


def test_plots_are_valid_pngs(tmp_path):
    history = [BatchLoss(batch=i + 1, epoch=i // 4, loss=1.0 / (i + 1), batch_size=2) for i in range(12)]
    assert_valid_png(plot_training_loss(history, tmp_path / "loss.png"))
    scores = [ScoredImage(image_path=str(i), gt_label=i % 2, pred_score=0.1 * i) for i in range(10)]
    assert_valid_png(plot_score_histogram(scores, 0.5, "normalized", tmp_path / "scores.png"))
    assert_valid_png(plot_score_histogram(scores[:1], None, "raw", tmp_path / "one_score.png"))


# ---------------------------------------------- a tiny Lightning run shaped like CflowPlus (manual optimization)
TRAIN_SIZE, TRAIN_BATCH = 7, 3  # batches of 3, 3 and 1 images: weighted and plain epoch means differ
TEST_LABELS = [0, 0, 1, 0, 1, 1, 0, 1, 0]


def image_loader(n: int, batch_size: int, labels: list[int] | None = None) -> DataLoader:
    items = [
        ImageItem(
            image=torch.full((3, 4, 4), float(i)),
            gt_label=torch.tensor(labels[i] if labels else 0),
            image_path=f"{'defect' if labels and labels[i] else 'good'}/{i:03d}.png",
        )
        for i in range(n)
    ]
    return DataLoader(items, batch_size=batch_size, collate_fn=ImageBatch.collate)


class ToyModel(LightningModule):
    """Logs ``train_loss`` like CflowPlus and returns ``{"loss": ...}``; tests with known scores."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(1.0))
        self.automatic_optimization = False
        self.post_processor = PostProcessor()
        self.returned_losses: list[float] = []

    def training_step(self, batch: ImageBatch, batch_idx: int) -> dict[str, torch.Tensor]:
        optimizer = self.optimizers()
        loss = ((self.weight - 0.1 * batch.image.mean(dim=(1, 2, 3))) ** 2).mean()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self.log("train_loss", loss, on_step=True, on_epoch=True, batch_size=batch.batch_size)
        self.returned_losses.append(float(loss.detach()))
        return {"loss": loss.detach()}

    def test_step(self, batch: ImageBatch, batch_idx: int) -> ImageBatch:
        return batch.update(pred_score=batch.image.mean(dim=(1, 2, 3)) / 10)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return image_loader(TRAIN_SIZE, TRAIN_BATCH)

    def test_dataloader(self) -> DataLoader:
        return image_loader(len(TEST_LABELS), 4, TEST_LABELS)


class DoubleScores(Callback):
    """Stands in for a post-processor that runs after the report callback and rescales scores in place."""

    def on_test_batch_end(self, trainer, pl_module, outputs, *args, **kwargs) -> None:
        outputs.pred_score = outputs.pred_score * 2


def toy_trainer(root: Path, callbacks: list[Callback]) -> Trainer:
    return Trainer(
        default_root_dir=root,
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def test_callback_records_losses_and_post_processed_scores(tmp_path):
    model = ToyModel()
    report = TrainingReportCallback()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "weights")
    trainer = toy_trainer(tmp_path / "run", [report, DoubleScores(), checkpoint])
    trainer.fit(model)

    loss_json = read_json(tmp_path / "run" / "report" / "training_loss.json")
    assert [b["loss"] for b in loss_json["batches"]] == pytest.approx(model.returned_losses)
    assert [b["batch_size"] for b in loss_json["batches"]] == [3, 3, 1, 3, 3, 1]
    assert [b["epoch"] for b in loss_json["batches"]] == [0, 0, 0, 1, 1, 1]
    assert [(e["first_batch"], e["last_batch"]) for e in loss_json["epochs"]] == [(1, 3), (4, 6)]
    # Lightning's own weighted epoch mean of the last epoch
    assert loss_json["epochs"][-1]["loss"] == pytest.approx(float(trainer.callback_metrics["train_loss_epoch"]))
    assert_valid_png(tmp_path / "run" / "report" / "training_loss.png")

    trainer.test(model, verbose=False)
    scores_json = read_json(tmp_path / "run" / "report" / "image_scores.json")
    expected = [2 * i / 10 for i in range(len(TEST_LABELS))]  # read after DoubleScores, although it runs later
    assert [s["pred_score"] for s in scores_json["images"]] == pytest.approx(expected)
    assert [s["gt_label"] for s in scores_json["images"]] == TEST_LABELS
    assert [s["image_path"] for s in scores_json["images"]] == [
        f"{'defect' if label else 'good'}/{i:03d}.png" for i, label in enumerate(TEST_LABELS)
    ]
    assert scores_json["score_scale"] == "normalized"
    assert scores_json["image_threshold"] == pytest.approx(0.5)
    assert_valid_png(tmp_path / "run" / "report" / "image_scores.png")

    # A new process testing from the checkpoint: the loss history comes back with it.
    fresh = toy_trainer(tmp_path / "from_checkpoint", [TrainingReportCallback()])
    fresh.test(ToyModel(), ckpt_path=checkpoint.best_model_path, verbose=False)
    restored = read_json(tmp_path / "from_checkpoint" / "report" / "training_loss.json")
    assert restored == loss_json
    assert len(read_json(tmp_path / "from_checkpoint" / "report" / "image_scores.json")["images"]) == len(TEST_LABELS)


def test_refit_starts_a_new_loss_history(tmp_path):
    model, report = ToyModel(), TrainingReportCallback(output_dir=tmp_path / "report")
    for _ in range(2):
        toy_trainer(tmp_path, [report]).fit(model)
    assert [r["batch"] for r in report.loss_history] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------------------------ distributed
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def distributed_worker(rank: int, port: int, root: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        report = TrainingReportCallback(output_dir=Path(root) / f"rank{rank}")
        # a distributed sampler gives rank 1 a repeat of rank 0's first image to even out the shares
        paths = ["good/0.png", "bad/1.png"] if rank == 0 else ["good/2.png", "good/0.png"]
        report.image_scores = [ScoredImage(image_path=p, gt_label=int("bad" in p), pred_score=0.1) for p in paths]
        trainer = SimpleNamespace(is_global_zero=rank == 0, default_root_dir=root)
        report.on_test_epoch_end(trainer, SimpleNamespace(post_processor=PostProcessor()))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method")
def test_scores_are_gathered_across_ranks_and_only_rank_zero_writes(tmp_path):
    # fork: the workers reuse the imported modules instead of importing anomalib again (seconds, not a minute)
    torch.multiprocessing.start_processes(
        distributed_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="fork"
    )
    images = read_json(tmp_path / "rank0" / "image_scores.json")["images"]
    assert [s["image_path"] for s in images] == ["good/0.png", "bad/1.png", "good/2.png"]
    assert not (tmp_path / "rank1").exists()


def test_gather_without_distributed_returns_the_records():
    records = [{"a": 1}]
    assert gather_from_all_ranks(records) is records


# ----------------------------------------------------------------------------------- a real run
@pytest.mark.slow
@pytest.mark.slow  # uses the session's trained model
def test_report_of_a_real_run_matches_anomalib_metrics(trained_run, monkeypatch):
    """Registered as CflowPlus registers it (or will): in configure_callbacks, after anomalib's own callbacks."""
    model, engine = trained_run.model, trained_run.engine
    configure_callbacks = model.configure_callbacks
    registered = any(isinstance(callback, TrainingReportCallback) for callback in configure_callbacks())
    if not registered:
        monkeypatch.setattr(model, "configure_callbacks", lambda: [*configure_callbacks(), TrainingReportCallback()])
    try:
        metrics = engine.test(model, datamodule=trained_run.datamodule, verbose=False)[0]
    finally:
        if not registered:  # leave the shared engine as it was
            callbacks = engine.trainer.callbacks
            callbacks[:] = [callback for callback in callbacks if not isinstance(callback, TrainingReportCallback)]

    results = Path(engine.trainer.default_root_dir)
    assert (results / "images").is_dir()  # anomalib's visualizer images, next to the report
    scores = read_json(results / "report" / "image_scores.json")
    images = scores["images"]
    test_set = trained_run.datamodule.test_data
    assert sorted(s["image_path"] for s in images) == sorted(str(p) for p in test_set.samples.image_path)
    assert all(s["gt_label"] == int(Path(s["image_path"]).parent.name != "good") for s in images)
    labels = [s["gt_label"] for s in images]
    values = [s["pred_score"] for s in images]
    assert roc_auc_score(labels, values) == pytest.approx(metrics["image_AUROC"], abs=1e-6)
    assert scores["score_scale"] == "normalized"
    assert scores["image_threshold"] == pytest.approx(0.5)
    predicted = [v > scores["image_threshold"] for v in values]
    true_positives = sum(p and t for p, t in zip(predicted, labels, strict=True))
    f1 = 2 * true_positives / (sum(predicted) + sum(labels))
    assert f1 == pytest.approx(metrics["image_F1Score"], abs=1e-6)
    assert_valid_png(results / "report" / "image_scores.png")
