"""Calibration: the streaming statistics, the calibration loop and the callback that refits it."""

from types import SimpleNamespace

import pytest
import torch
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Resize

from anomalib_cflow_plus import CflowPlus, calibration
from anomalib_cflow_plus.calibration import (
    PEAK_CONCENTRATION_THRESHOLD,
    PEAK_MIN_IMAGES,
    POSITION_STD_FLOOR,
    CalibrationCallback,
    LayerStatistics,
    calibrate,
    training_images,
)


class RecordingModule:
    """The parts of a CflowPlus the callback reads: its torch model, device and pre-processor."""

    def __init__(self, pre_processor=None) -> None:
        self.pre_processor = pre_processor
        self.model = object()
        self.device = torch.device("cpu")


def _trainer(*shapes, world_size: int = 1, strategy=None):
    loader = [SimpleNamespace(image=torch.zeros(shape)) for shape in shapes]
    return SimpleNamespace(train_dataloader=loader, world_size=world_size, strategy=strategy)


@pytest.fixture
def calibrations(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record the callback's calls of ``calibrate``: (model, image shapes, merge)."""
    calls = []

    def record(model, images, device, merge=None) -> None:
        calls.append((model, [tuple(image.shape) for image in images], merge))

    monkeypatch.setattr(calibration, "calibrate", record)
    return calls


def test_calibrates_only_after_the_decoders_moved(calibrations):
    callback, module, trainer = CalibrationCallback(), RecordingModule(), _trainer((2, 3, 8, 8), (1, 3, 8, 8))
    callback.on_validation_epoch_start(trainer, module)
    callback.on_fit_end(trainer, module)
    assert calibrations == []  # nothing trained yet: e.g. validating a loaded checkpoint
    callback.on_train_batch_end(trainer, module, None, None, 0)
    callback.on_validation_epoch_start(trainer, module)
    assert calibrations == [(module.model, [(2, 3, 8, 8), (1, 3, 8, 8)], None)]  # the torch model, one process
    callback.on_fit_end(trainer, module)  # validation already saw these decoders
    assert len(calibrations) == 1
    callback.on_train_batch_end(trainer, module, None, None, 1)
    callback.on_fit_end(trainer, module)  # training ended without a validation after it
    assert len(calibrations) == 2


def test_with_several_processes_the_statistics_merge_through_the_trainers_strategy(calibrations):
    reduced = []

    def reduce(values, reduce_op):
        reduced.append(reduce_op)
        return values * 2 if reduce_op == "sum" else values

    strategy = SimpleNamespace(reduce=reduce, root_device=torch.device("cpu"))
    callback, module = CalibrationCallback(), RecordingModule()
    callback.on_train_batch_end(None, module, None, None, 0)
    callback.on_fit_end(_trainer((1, 3, 8, 8), world_size=2, strategy=strategy), module)
    ((_, _, process_reduce),) = calibrations
    statistics = LayerStatistics(1)
    statistics.update([torch.ones(1, 2, 2)])
    statistics.merge(process_reduce)
    assert reduced == ["max", "sum", "sum", "sum", "sum"]  # maximum, totals, squares, peaks, counts
    assert statistics.count.tolist() == [2.0]  # two processes' images


def test_training_images_are_pre_processed_like_training():
    module = RecordingModule(PreProcessor(transform=Resize((4, 4))))
    images = list(training_images(_trainer((2, 3, 8, 8)), module))
    assert [tuple(image.shape) for image in images] == [(2, 3, 4, 4)]


def test_model_registers_the_callback():
    callbacks = CflowPlus(coupling_blocks=1).configure_callbacks()
    assert sum(isinstance(callback, CalibrationCallback) for callback in callbacks) == 1
    assert any(isinstance(callback, PreProcessor) for callback in callbacks)


def test_layer_statistics():
    statistics = LayerStatistics(2)
    first, second = torch.arange(6.0).reshape(2, 3), torch.tensor([[10.0, 20.0]])
    statistics.update([first, second])
    statistics.update([first + 6, second])
    maximum, mean, std, positions = statistics.finalize()
    torch.testing.assert_close(maximum, torch.tensor([11.0, 20.0]))
    torch.testing.assert_close(mean, torch.tensor([5.5, 15.0]))
    torch.testing.assert_close(std, torch.tensor([torch.arange(12.0).std(unbiased=False).item(), 5.0]))
    assert positions is None  # "layer": the image score needs no position statistics
    positions = statistics.finalize("position")[3]
    all_first = torch.cat([first, first + 6])  # 4 images of layer 0, 3 positions each
    torch.testing.assert_close(positions[0][0], all_first.mean(dim=0))
    torch.testing.assert_close(positions[0][1], all_first.std(dim=0, unbiased=False))
    torch.testing.assert_close(positions[1][0], torch.tensor([10.0, 20.0]))
    floor = POSITION_STD_FLOOR * 1e-6  # layer 1 never varies: its stds sit at the numerical floor
    assert bool((positions[1][1] <= 1e-5).all()) and bool((positions[1][1] >= floor).all())


def test_empty_statistics_raise():
    with pytest.raises(RuntimeError, match="calibration"):
        LayerStatistics(1).finalize()


def test_calibrate_fits_the_model_constants_and_restores_its_mode():
    from anomalib_cflow_plus.torch_model import CflowPlusModel

    model = CflowPlusModel(backbone="efficientnet_lite0", coupling_blocks=1, condition_vector=16).train()
    images = [torch.rand(2, 3, 64, 64), torch.rand(1, 3, 64, 64)]
    reduced = []  # a single process's reduce: records what it merges
    calibrate(
        model, images, torch.device("cpu"), reduce=lambda values, op: reduced.append((values.clone(), op)) or values
    )
    assert model.training and bool(model.anomaly_map.calibrated)
    counts = [values for values, op in reduced if op == "sum" and values.shape == (3,)]
    assert len(counts) == 1 and counts[0].tolist() == [3, 3, 3]  # 3 images per layer
    assert any(op == "max" and values.shape == (8, 8) for values, op in reduced)  # layer 0 at stride 8 of 64 px
    expected = max(float(ll.max()) for ll in (model.eval().log_likelihood_maps(model.encode(x))[0] for x in images))
    assert float(model.anomaly_map.layer_max[0]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow  # trains a model
def test_a_checkpoint_without_validation_is_calibrated(tiny_dataset, tmp_path):
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from ..helpers import tiny_datamodule

    seed_everything(0)
    model = CflowPlus(backbone="efficientnet_lite0", coupling_blocks=1, visualizer=False)
    engine = Engine(max_epochs=1, default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
                    limit_val_batches=0, enable_progress_bar=False)  # fmt: skip
    datamodule = tiny_datamodule(tiny_dataset)
    engine.fit(model, datamodule=datamodule)
    checkpoint = (
        engine.trainer.checkpoint_callback.best_model_path or engine.trainer.checkpoint_callback.last_model_path
    )
    restored = CflowPlus.load_from_checkpoint(checkpoint)
    assert bool(restored.model.anomaly_map.calibrated)
    torch.testing.assert_close(restored.model.anomaly_map.layer_max, model.model.anomaly_map.layer_max)
    restored.on_test_epoch_start()  # a calibrated model may score
    images = next(iter(datamodule.test_dataloader())).image
    with torch.no_grad():
        expected, actual = model.model.eval()(images), restored.model.eval()(images)
    torch.testing.assert_close(actual.pred_score, expected.pred_score)  # with the trained model's calibration
    assert bool(torch.isfinite(actual.pred_score).all())


def _maps_peaking_at(peaks, grid=(16, 16), seed=0):
    """One layer's maps ``(N, h, w)`` of noise, each image least likely at its own ``peaks[i]`` (row, column)."""
    generator = torch.Generator().manual_seed(seed)
    maps = torch.randn(len(peaks), *grid, generator=generator) * 0.1
    for index, (row, column) in enumerate(peaks):
        maps[index, row, column] = -5.0
    return maps


def test_peak_concentration_tells_one_hot_spot_from_spread_peaks():
    spread = [(row, column) for row in range(0, 16, 4) for column in range(0, 16, 4)]  # 16 places, one image each
    hot_spot = [(8 + index % 2, 8) for index in range(16)]  # within one 3x3 window
    statistics = LayerStatistics(2)
    statistics.update([_maps_peaking_at(hot_spot), _maps_peaking_at(spread)])
    concentration = statistics.peak_concentration()
    assert concentration[0] == pytest.approx(1.0)
    assert concentration[1] == pytest.approx(1 / 16)


@pytest.mark.parametrize(("second_layer_spread", "expected"), [(False, True), (True, False)])
def test_auto_calibrates_by_position_only_when_every_layer_peaks_at_one_place(second_layer_spread, expected):
    hot_spot = [(3 + index % 2, 12) for index in range(PEAK_MIN_IMAGES)]
    spread = [(index, 15 - index) for index in range(PEAK_MIN_IMAGES)] if second_layer_spread else hot_spot
    statistics = LayerStatistics(2)
    statistics.update([_maps_peaking_at(hot_spot), _maps_peaking_at(spread, seed=1)])
    positions = statistics.finalize("auto")[3]
    assert (positions is not None) is expected
    assert statistics.finalize("position")[3] is not None and statistics.finalize("layer")[3] is None


@pytest.mark.parametrize("images", [2, 4, PEAK_MIN_IMAGES - 1])
def test_auto_never_calibrates_by_position_from_a_few_images(images):
    """Two images peaking anywhere put half of them in one window: too few to tell a hot spot from chance."""
    spread = [(2 * index % 16, (5 * index + 3) % 16) for index in range(images)]
    statistics = LayerStatistics(1)
    statistics.update([_maps_peaking_at(spread)])
    assert statistics.peak_concentration()[0] >= 1 / images
    if images == 2:
        assert statistics.peak_concentration()[0] >= PEAK_CONCENTRATION_THRESHOLD  # the old rule fired here
    assert statistics.finalize("auto")[3] is None
    hot_spot = LayerStatistics(1)
    hot_spot.update([_maps_peaking_at([(8, 8)] * images)])  # even every image at one place
    assert hot_spot.finalize("auto")[3] is None
    hot_spot.update([_maps_peaking_at([(8, 8)] * (PEAK_MIN_IMAGES - images))])
    assert hot_spot.finalize("auto")[3] is not None


def test_merged_statistics_equal_those_of_all_images():
    maps = [torch.randn(6, 4, 4), torch.randn(6, 2, 2)]
    whole, first, second = LayerStatistics(2), LayerStatistics(2), LayerStatistics(2)
    whole.update(maps)
    first.update([values[:2] for values in maps])
    second.update([values[2:] for values in maps])
    reductions = {"sum": torch.add, "max": torch.maximum}
    partner = {id(tensor): other for mine, theirs in ((first, second),) for tensor, other in zip(
        [*mine.maximum, *mine.total, *mine.total_sq, *mine.peaks, mine.count],
        [*theirs.maximum, *theirs.total, *theirs.total_sq, *theirs.peaks, theirs.count], strict=True)}  # fmt: skip
    first.merge(lambda tensor, op: reductions[op](tensor, partner[id(tensor)]))  # what all-reduce does across ranks
    for merged, expected in zip(first.finalize("position"), whole.finalize("position"), strict=True):
        if isinstance(merged, list):
            for (mean, std), (expected_mean, expected_std) in zip(merged, expected, strict=True):
                torch.testing.assert_close(mean, expected_mean)
                torch.testing.assert_close(std, expected_std)
        else:
            torch.testing.assert_close(merged, expected)
    assert first.peak_concentration() == whole.peak_concentration()


def test_calibration_images_of_two_sizes_are_refused():
    statistics = LayerStatistics(1)
    statistics.update([torch.zeros(1, 4, 4)])
    with pytest.raises(ValueError, match="share one size"):
        statistics.update([torch.zeros(1, 8, 8)])
