from types import SimpleNamespace

import torch
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Resize

from anomalib_cflow_plus import CflowPlus
from anomalib_cflow_plus.callbacks import CalibrationCallback, training_images


class RecordingModule:
    def __init__(self, pre_processor=None) -> None:
        self.pre_processor = pre_processor
        self.calibrated_on: list[list[torch.Tensor]] = []

    def calibrate(self, images) -> None:
        self.calibrated_on.append(list(images))


def _trainer(*shapes):
    return SimpleNamespace(train_dataloader=[SimpleNamespace(image=torch.zeros(shape)) for shape in shapes])


def test_calibrates_only_after_the_decoders_moved():
    callback, module, trainer = CalibrationCallback(), RecordingModule(), _trainer((2, 3, 8, 8), (1, 3, 8, 8))
    callback.on_validation_epoch_start(trainer, module)
    callback.on_fit_end(trainer, module)
    assert module.calibrated_on == []  # nothing trained yet: e.g. validating a loaded checkpoint
    callback.on_train_batch_end(trainer, module, None, None, 0)
    callback.on_validation_epoch_start(trainer, module)
    assert [[tuple(b.shape) for b in batches] for batches in module.calibrated_on] == [[(2, 3, 8, 8), (1, 3, 8, 8)]]
    callback.on_fit_end(trainer, module)  # validation already saw these decoders
    assert len(module.calibrated_on) == 1
    callback.on_train_batch_end(trainer, module, None, None, 1)
    callback.on_fit_end(trainer, module)  # training ended without a validation after it
    assert len(module.calibrated_on) == 2


def test_training_images_are_pre_processed_like_training():
    module = RecordingModule(PreProcessor(transform=Resize((4, 4))))
    images = list(training_images(_trainer((2, 3, 8, 8)), module))
    assert [tuple(image.shape) for image in images] == [(2, 3, 4, 4)]


def test_model_registers_the_callback():
    callbacks = CflowPlus(coupling_blocks=1).configure_callbacks()
    assert sum(isinstance(callback, CalibrationCallback) for callback in callbacks) == 1
    assert any(isinstance(callback, PreProcessor) for callback in callbacks)
