"""Device and dtype hygiene: every tensor the model makes at run time follows its input's device and dtype.

The model runs on the ``meta`` device (shapes, no data) under :class:`DeviceWatch`, a dispatch mode that sees every
op, factories included. A tensor made on the CPU from a meta input, or a CPU tensor taken into work on the meta
device, is what on a GPU would be a CPU tensor in CUDA work: an error, or a silent host copy and synchronization.
So a CUDA-only device bug fails here, without a GPU. With a GPU, the same tests also run on it.

Values are read nowhere on ``meta`` (``bool(tensor)`` raises there), so the training path is driven through the
model's methods, in the order a training step calls them, rather than through a whole training step.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
from anomalib.data.utils.tiler import ImageUpscaleMode, Tiler
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

from anomalib_cflow_plus.anomaly_map import AnomalyMapGenerator
from anomalib_cflow_plus.calibration import calibrate
from anomalib_cflow_plus.flow import flow_loss
from anomalib_cflow_plus.torch_model import CflowPlusModel
from anomalib_cflow_plus.training import fiber_plan

PACKAGE = "anomalib_cflow_plus"
DEVICES = ["meta", *(["cuda"] if torch.cuda.is_available() else [])]

# The only places where the model may make a tensor off its input's device ("created") or take one into work on
# that device ("mixed"), each by design. Everything else off the input's device fails the tests.
ALLOWED_OFF_DEVICE: dict[tuple[str, str], str] = {
    # Calibration statistics live on the CPU in float64 (running sums of squares over the whole training set; not
    # every accelerator has float64, MPS has none): `__init__` and `update` make them there, and `update` copies
    # each batch's log-likelihood maps there (`.double().cpu()`).
    ("created", f"{PACKAGE}.calibration:LayerStatistics.__init__"): "CPU float64 statistics, by design",
    ("created", f"{PACKAGE}.calibration:LayerStatistics.update"): "CPU float64 statistics, by design",
    ("created", f"{PACKAGE}.calibration:LayerStatistics.start"): "CPU float64 statistics, by design",
    # The finished (CPU) constants enter the model through its buffers, on its device: once per calibration.
    ("mixed", f"{PACKAGE}.anomaly_map:AnomalyMapGenerator.set_calibration"): "copies CPU statistics into buffers",
}


class Event(NamedTuple):
    """One op that broke the watch's rule: what it did, where in the package, and to which tensor."""

    kind: str  # "created": made off the device from on-device (or no) inputs; "mixed": took an off-device input
    # into work on the device; "dtype": made a floating-point tensor of another dtype on the device
    site: str  # "module:qualname" of the innermost package frame (or of the innermost frame outside torch)
    op: str
    device: torch.device
    dtype: torch.dtype
    shape: tuple[int, ...]


def _site() -> str:
    """Name the innermost frame of the package (comprehensions skipped), else the innermost frame outside torch."""
    frame = sys._getframe(3)  # past _site, DeviceWatch._record and DeviceWatch.__torch_dispatch__
    outside = None
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        name = frame.f_code.co_name
        if module.partition(".")[0] == PACKAGE and not name.startswith("<"):
            return f"{module}:{frame.f_code.co_qualname}"
        if outside is None and module.partition(".")[0] != "torch":
            outside = f"{module}:{frame.f_code.co_qualname}"
        frame = frame.f_back
    return outside or "?"


class DeviceWatch(TorchDispatchMode):
    """Record every op that makes a tensor off ``device``, or takes one into work on it; with ``dtype``, also every
    floating-point tensor made on ``device`` in another dtype.

    A tensor is "created" off the device when an op outputs it without having an off-device input (a factory such
    as ``torch.zeros(n)`` or ``torch.Generator()``'s ``randperm``, or a copy such as ``.cpu()``); ops on it that stay
    off the device are its consequences, not recorded again. It is "mixed" in when an op takes it along with
    tensors on the device (indexing with a CPU index, ``copy_`` from the CPU, a CPU constant cached elsewhere).

    On ``meta``, a copy to the CPU returns zeros of the right shape and dtype: a meta tensor has no data to copy.
    """

    def __init__(self, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.dtype = dtype
        self.events: list[Event] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        inputs = [leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
        target = kwargs.get("device")
        if (
            func is torch.ops.aten._to_copy.default
            and inputs[0].is_meta
            and target
            and torch.device(target).type == "cpu"
        ):
            output = torch.zeros(inputs[0].shape, dtype=kwargs.get("dtype") or inputs[0].dtype)
        else:
            output = func(*args, **kwargs)
        outputs = [leaf for leaf in tree_leaves(output) if isinstance(leaf, torch.Tensor)]
        off_inputs = [tensor for tensor in inputs if tensor.device != self.device]
        off_outputs = [tensor for tensor in outputs if tensor.device != self.device]
        if off_outputs and not off_inputs:
            self._record("created", func, off_outputs[0])
        elif off_inputs and any(tensor.device == self.device for tensor in inputs + outputs):
            self._record("mixed", func, off_inputs[0])
        if self.dtype is not None:  # off the device, tensors answer to the device rule (and its allow-list)
            other = [
                tensor
                for tensor in outputs
                if tensor.device == self.device and tensor.is_floating_point() and tensor.dtype != self.dtype
            ]
            if other:
                self._record("dtype", func, other[0])
        return output

    def _record(self, kind: str, func: Any, tensor: torch.Tensor) -> None:
        self.events.append(Event(kind, _site(), str(func), tensor.device, tensor.dtype, tuple(tensor.shape)))

    def unexpected(self, allowed: dict[tuple[str, str], str]) -> list[Event]:
        """The events at no allowed ``(kind, site)``."""
        return [event for event in self.events if (event.kind, event.site) not in allowed]

    def sites(self) -> set[tuple[str, str]]:
        """Every ``(kind, site)`` recorded."""
        return {(event.kind, event.site) for event in self.events}


@pytest.fixture(scope="module")
def cpu_model() -> CflowPlusModel:
    torch.manual_seed(0)
    return CflowPlusModel(backbone="efficientnet_lite0", coupling_blocks=2, condition_vector=16)


@pytest.fixture
def on_device(cpu_model: CflowPlusModel) -> Callable[..., CflowPlusModel]:
    """Copies of the small model on a device, in a dtype, with anomaly-map settings replaced."""

    def make(device: str, dtype: torch.dtype = torch.float32, **settings: Any) -> CflowPlusModel:
        model = copy.deepcopy(cpu_model).to(device=device, dtype=dtype)
        for name, value in settings.items():
            setattr(model.anomaly_map, name, value)
        return model

    return make


def images(device: str, dtype: torch.dtype = torch.float32, size: tuple[int, int] = (64, 96)) -> torch.Tensor:
    """A batch of 2 images; empty on ``meta``, random elsewhere."""
    if device == "meta":
        return torch.empty(2, 3, *size, device=device, dtype=dtype)
    return torch.randn(2, 3, *size, device=device, dtype=dtype)


def set_constants(model: CflowPlusModel, position_grids: list[tuple[int, int]] | None = None) -> None:
    """Calibrate with CPU float32 constants, as :meth:`LayerStatistics.finalize` returns them (outside any watch)."""
    layers = len(model.layers)
    positions = None
    if position_grids is not None:
        positions = [(torch.full(grid, -2.0), torch.full(grid, 0.5)) for grid in position_grids]
    model.anomaly_map.set_calibration(torch.zeros(layers), torch.full((layers,), -2.0), torch.ones(layers), positions)


def assert_follows(watch: DeviceWatch) -> None:
    unexpected = watch.unexpected(ALLOWED_OFF_DEVICE)
    assert not unexpected, "tensors off the input's device or dtype:\n" + "\n".join(map(str, unexpected))


def run_training_path(model: CflowPlusModel, batch: torch.Tensor, joint_layers: bool) -> None:
    """One batch through the training path: features, ActNorm initialization, fiber plan, two steps with backward.

    The plan's indices are drawn as a seeded run draws them, by a generator on the model's device (``meta`` has
    none: they are drawn on the CPU and moved, outside the watch).
    """
    features = model.encode(batch)
    for actnorm, layer_features in zip(model.normalizations, features, strict=True):
        actnorm.initialize(model.fibers(layer_features)[0])  # `initialize_normalization` reads its flag's value
    fibers, conditions = zip(*(model.fibers(layer_features) for layer_features in features), strict=True)
    plan = draw_plan([condition.grid_size for condition in conditions], len(batch), joint_layers, batch.device)
    if not joint_layers:
        fibers = [layer_fibers.flatten(end_dim=1) for layer_fibers in fibers]
    for step in plan[:2]:
        losses = []
        for layer, index in step:
            picked = fibers[layer][:, index] if joint_layers else fibers[layer][index]
            losses.append(flow_loss(model.fiber_log_likelihood(layer, picked, conditions[layer].select(index))))
        torch.stack(losses).sum().backward()


def draw_plan(
    positions: list[int], count: int, joint_layers: bool, device: torch.device
) -> list[list[tuple[int, torch.Tensor]]]:
    if device.type != "meta":
        generator = torch.Generator(device=device).manual_seed(0)
        return fiber_plan(positions, count, 16, joint_layers=joint_layers, generator=generator)
    with _disable_current_modes():  # meta has no generator: draw on the CPU and move, unwatched
        plan = fiber_plan(positions, count, 16, joint_layers=joint_layers, generator=torch.Generator().manual_seed(0))
        return [[(layer, index.to(device)) for layer, index in step] for step in plan]


def test_watch_catches_tensors_off_the_device() -> None:
    """The control: the watch sees a factory's CPU tensor, a CPU index into a meta tensor, and a dtype change."""
    data = torch.empty(4, 3, device="meta")
    with DeviceWatch("meta", torch.float32) as watch:
        torch.zeros(3)
        data[torch.tensor([0, 2])]
        data.double()
        data.cpu()
        (data + 1).sum()  # on the device: nothing to record
    kinds = [(event.kind, event.op, event.device) for event in watch.events]
    cpu = torch.device("cpu")
    assert ("created", "aten.zeros.default", cpu) in kinds
    assert ("mixed", "aten.index.Tensor", cpu) in kinds
    assert ("dtype", "aten._to_copy.default", torch.device("meta")) in kinds
    assert ("created", "aten._to_copy.default", cpu) in kinds
    assert len(kinds) == 4
    assert {event.site for event in watch.events} == {f"{__name__}:test_watch_catches_tensors_off_the_device"}


SCORING = [
    pytest.param({}, None, id="paper-combined"),
    pytest.param({"score_mode": "zscore", "image_score_mode": "map", "top_k_percent": 1.0}, None, id="zscore-map"),
    pytest.param({"image_score_mode": "layer_max"}, [(4, 4), (2, 2), (1, 1)], id="position-layer_max"),
    pytest.param({"score_mode": "zscore"}, [(8, 12), (4, 6), (2, 3)], id="position-zscore-combined"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("settings", "position_grids"), SCORING)
def test_scoring_follows_the_input(on_device, device, settings, position_grids) -> None:
    model = on_device(device, **settings).eval()
    set_constants(model, position_grids)  # grids other than the input's are resized onto it
    batch = images(device)
    with torch.no_grad(), DeviceWatch(batch.device) as watch:
        result = model(batch)
    assert_follows(watch)
    assert result.anomaly_map.shape == (2, 1, 64, 96)
    assert result.anomaly_map.device == result.pred_score.device == batch.device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tile_condition", ["image", "tile"])
def test_tiled_scoring_follows_the_input(on_device, device, tile_condition) -> None:
    model = on_device(device).eval()
    model.tile_condition = tile_condition
    model.tiler = Tiler(tile_size=32, stride=32, mode=ImageUpscaleMode.PADDING)
    set_constants(model)
    batch = images(device)
    with torch.no_grad(), DeviceWatch(batch.device) as watch:
        result = model(batch)
    assert_follows(watch)
    assert result.anomaly_map.device == batch.device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("joint_layers", [True, False], ids=["joint", "paper"])
def test_training_path_follows_the_input(on_device, device, joint_layers) -> None:
    model = on_device(device).train()
    batch = images(device)
    with DeviceWatch(batch.device) as watch:
        run_training_path(model, batch, joint_layers)
    assert_follows(watch)
    gradients = [parameter.grad for parameter in model.decoders.parameters() if parameter.grad is not None]
    assert gradients
    assert all(gradient.device == batch.device for gradient in gradients)


@pytest.mark.parametrize("device", DEVICES)
def test_calibration_keeps_only_its_statistics_on_the_cpu(on_device, device) -> None:
    model = on_device(device)
    model.image_calibration = "position"
    batch = images(device)
    with DeviceWatch(batch.device) as watch:
        calibrate(model, [batch, batch], batch.device)
    assert_follows(watch)
    # the watch did see the designed CPU statistics, and their way back into the buffers: the allow-list is live
    assert watch.sites() >= set(ALLOWED_OFF_DEVICE)
    assert model.anomaly_map.position_calibrated
    assert {buffer.device for buffer in model.anomaly_map.buffers()} == {batch.device}


def test_float64_throughout(on_device) -> None:
    """A float64 model on float64 images makes float64 tensors alone: the positional condition and the smoothing
    matrices follow the features' dtype, and the anomaly map is computed in it, not in float32."""
    model = on_device("meta", torch.float64)
    batch = images("meta", torch.float64)
    with DeviceWatch("meta", torch.float64) as watch:
        calibrate(model, [batch], batch.device)
        model.eval()
        with torch.no_grad():
            result = model(batch)
        model.train()
        run_training_path(model, batch, joint_layers=True)
    assert_follows(watch)
    assert result.anomaly_map.dtype == result.pred_score.dtype == torch.float64
    assert {buffer.dtype for buffer in model.anomaly_map.buffers() if buffer.is_floating_point()} == {torch.float64}


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")  # meta holds no values
def test_loaded_position_statistics_follow_the_buffers() -> None:
    """Loading a (CPU, float32) checkpoint's position statistics keeps the generator's device and dtype."""
    saved = AnomalyMapGenerator(2)
    saved.set_calibration(torch.zeros(2), torch.zeros(2), torch.ones(2), [(torch.zeros(3, 4), torch.ones(3, 4))] * 2)
    loaded = AnomalyMapGenerator(2).to(device="meta", dtype=torch.float64)
    loaded.load_state_dict(saved.state_dict())
    assert loaded.position_mean_0.shape == (3, 4)
    for buffer in (loaded.position_mean_0, loaded.position_std_1, loaded.layer_max):
        assert (buffer.device.type, buffer.dtype) == ("meta", torch.float64)


def test_unseeded_fiber_plan_follows_the_device() -> None:
    with DeviceWatch("meta") as watch:
        plan = fiber_plan([16, 4], 2, 8, joint_layers=False, generator=None, device=torch.device("meta"))
    assert not watch.events
    assert all(index.is_meta for step in plan for _, index in step)
