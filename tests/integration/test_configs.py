"""Every config under configs/ parses with anomalib's CLI and builds the CflowPlus, resolution and data it promises.

Parsing goes through ``AnomalibCLI(["train", "--config", ...], run=False)``, in process: the same parser,
validation and class instantiation as ``anomalib train --config``, without training. The models of the
parse-everything test are built on torch's meta device (shapes, no memory, no weight init): a
wide_resnet50_2 takes about 4 s to initialize on this CPU, and its values are not what is checked here.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))
MVTEC_ENCODERS = ("wide_resnet50_2", "efficientnet_lite0")

# The specification, kept apart from configs/mvtec/generate.py on purpose: the input size (-inp) of each
# MVTec AD category in the reference commands of the CFLOW-AD authors' README (github.com/gudovskiy/cflow-ad).
PAPER_IMAGE_SIZE = {
    "bottle": 512, "cable": 256, "capsule": 256, "carpet": 512, "grid": 512,
    "hazelnut": 256, "leather": 512, "metal_nut": 256, "pill": 256, "screw": 512,
    "tile": 512, "toothbrush": 512, "transistor": 128, "wood": 512, "zipper": 512,
}  # fmt: skip
PAPER_FLOW = {"condition_vector": 128, "coupling_blocks": 8, "clamp_alpha": 1.9, "training_recipe": "paper"}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@dataclass(frozen=True)
class Expected:
    """What a config must build: encoder, feature strides, input size and datamodule."""

    backbone: str
    strides: tuple[int, ...]
    image_size: tuple[int, int]  # (height, width)
    data: str
    category: str
    paper_flow: bool = True


STRIDES = {"wide_resnet50_2": (4, 8, 16), "efficientnet_lite0": (8, 16, 32), "efficientnet_lite1": (8, 16, 32)}
OTHER_CONFIGS = {
    "demo.yaml": Expected("efficientnet_lite1", STRIDES["efficientnet_lite1"], (256, 256), "MVTecAD", "brick", False),
    "folder.yaml": Expected("efficientnet_lite1", STRIDES["efficientnet_lite1"], (512, 512), "Folder", "", False),
    "folder_long_parts.yaml": Expected(
        "efficientnet_lite1", STRIDES["efficientnet_lite1"], (512, 1280), "Folder", "", False
    ),
    "multi_category.yaml": Expected(
        "efficientnet_lite1", STRIDES["efficientnet_lite1"], (256, 256), "MultiCategory", "brick+grass+gravel", False
    ),
    "visa.yaml": Expected("wide_resnet50_2", STRIDES["wide_resnet50_2"], (256, 256), "Visa", "pcb1"),
}


def expected(path: Path) -> Expected:
    """The expectation for one config file."""
    relative = path.relative_to(CONFIG_DIR)
    if relative.parts[0] == "mvtec":
        backbone, category = relative.parts[1], relative.stem
        size = PAPER_IMAGE_SIZE[category]
        return Expected(backbone, STRIDES[backbone], (size, size), "MVTecAD", category)
    return OTHER_CONFIGS[relative.as_posix()]


def parse(path: Path, root_dir: Path):
    """Parse and instantiate one config the way ``anomalib train --config path`` does, without running."""
    from anomalib.cli import AnomalibCLI

    return AnomalibCLI(["train", "--config", str(path), "--default_root_dir", str(root_dir)], run=False)


def transform_steps(model) -> list[v2.Transform]:
    """The model pre-processor's transforms, flattened out of a Compose."""
    transform = model.pre_processor.transform
    return list(transform.transforms) if isinstance(transform, v2.Compose) else [transform]


def load_generator():
    """Import configs/mvtec/generate.py, which is a script, not a package module."""
    spec = importlib.util.spec_from_file_location("mvtec_config_generator", CONFIG_DIR / "mvtec" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while being defined
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_every_mvtec_category_and_encoder_has_a_config():
    mvtec = {path.relative_to(CONFIG_DIR / "mvtec").as_posix() for path in CONFIGS if "mvtec" in path.parts}
    assert mvtec == {f"{encoder}/{category}.yaml" for encoder in MVTEC_ENCODERS for category in PAPER_IMAGE_SIZE}
    assert {path.name for path in CONFIGS if path.parent == CONFIG_DIR} == set(OTHER_CONFIGS)


def test_mvtec_configs_are_in_sync_with_their_generator():
    generator = load_generator()
    assert generator.PAPER_IMAGE_SIZE == PAPER_IMAGE_SIZE
    stale = [path.relative_to(CONFIG_DIR).as_posix() for path in generator.stale_configs()]
    assert not stale, f"run python configs/mvtec/generate.py; out of date: {stale}"


@pytest.mark.parametrize("path", CONFIGS, ids=[path.relative_to(CONFIG_DIR).as_posix() for path in CONFIGS])
def test_config_parses_and_builds_its_model(path: Path, tmp_path: Path):
    from anomalib.data import Folder, MVTecAD, Visa

    from anomalib_cflow_plus import CflowPlus
    from anomalib_cflow_plus.data import MultiCategory

    want = expected(path)
    with torch.device("meta"):
        cli = parse(path, tmp_path)
    model, datamodule = cli.model, cli.datamodule

    assert type(model) is CflowPlus
    assert model.backbone == want.backbone
    encoder_levels = model.model.feature_encoder.feature_info
    assert encoder_levels.module_name() == model.model.layers
    assert tuple(encoder_levels.reduction()) == want.strides
    if want.backbone == "wide_resnet50_2":
        assert model.model.layers == ["layer1", "layer2", "layer3"]

    steps = transform_steps(model)
    resizes = [step for step in steps if isinstance(step, v2.Resize)]
    normalizes = [step for step in steps if isinstance(step, v2.Normalize)]
    assert len(resizes) == 1 and tuple(resizes[0].size) == want.image_size
    assert len(normalizes) == 1 and steps.index(resizes[0]) < steps.index(normalizes[0])
    assert list(normalizes[0].mean) == IMAGENET_MEAN and list(normalizes[0].std) == IMAGENET_STD

    if want.paper_flow:
        flow = cli.config["train"]["model"]["init_args"]
        assert {name: flow[name] for name in PAPER_FLOW} == PAPER_FLOW
        assert (model.training_recipe, model.fiber_batch_size, model.lr) == ("paper", 256, 2e-4)
        assert model.model.condition_vector == 128
        assert model.pre_trained

    data_class = {"MVTecAD": MVTecAD, "Visa": Visa, "Folder": Folder, "MultiCategory": MultiCategory}[want.data]
    assert type(datamodule) is data_class
    assert datamodule.category == want.category


def calibrated(model, image_size: tuple[int, int]):
    """The model calibrated on two random images of ``image_size``, pre-processed as the config says: it may score."""
    from anomalib_cflow_plus.calibration import calibrate

    calibrate(model.model, [model.pre_processor.transform(torch.rand(2, 3, *image_size))], torch.device("cpu"))
    return model


@pytest.mark.parametrize("category", ["transistor", "cable"])
def test_config_resolution_reaches_the_anomaly_map(category: str, tmp_path: Path):
    """A real (not meta) model from a config scores an odd-sized image at the category's paper size."""
    cli = parse(CONFIG_DIR / "mvtec" / "efficientnet_lite0" / f"{category}.yaml", tmp_path)
    model = calibrated(cli.model.eval(), (200, 300))
    with torch.no_grad():
        output = model(torch.rand(1, 3, 200, 300))
    size = PAPER_IMAGE_SIZE[category]
    assert output.anomaly_map.shape == (1, 1, size, size)


def test_long_parts_config_keeps_the_aspect_ratio(tmp_path: Path):
    """A 2:5 frame comes out as a 512 x 1280 map, with the thresholds set from good images when no defect is seen."""
    from anomalib_cflow_plus import CflowPlusPostProcessor

    cli = parse(CONFIG_DIR / "folder_long_parts.yaml", tmp_path)
    model = calibrated(cli.model.eval(), (410, 1024))
    assert isinstance(model.post_processor, CflowPlusPostProcessor)
    assert (model.post_processor.threshold, model.post_processor.normal_fpr) == ("auto", 0.01)
    with torch.no_grad():
        output = model(torch.rand(1, 3, 410, 1024))
    assert output.anomaly_map.shape == (1, 1, 512, 1280)
