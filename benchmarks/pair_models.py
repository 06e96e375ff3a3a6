"""anomalib's Cflow and CflowPlus variants built with identical settings and identical encoder weights.

Used by ``vs_cflow.py`` and its child jobs (``vs_cflow_jobs.py``). Both models wrap their timm
``features_only`` encoder in anomalib's ``TimmFeatureExtractor`` at ``model.model.encoder``, so one
encoder state dict loads into either. Nothing here touches the network: both models are built with
``pre_trained=False`` and get their encoder weights from :func:`shared_encoder_weights`.
"""

from __future__ import annotations

import inspect
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from anomalib.models import Cflow
from anomalib.models.components import AnomalibModule
from torch import Tensor, nn

from anomalib_cflow_plus import CflowPlus
from anomalib_cflow_plus.backbones import PACKAGED_BACKBONES, load_encoder_weights, packaged_state_dict
from anomalib_cflow_plus.calibration import calibrate
from anomalib_cflow_plus.torch_model import feature_levels, resolve_layers

CFLOW = "cflow"
CFLOW_PLUS = "cflow_plus"
CFLOW_NAME = "Cflow"
# CflowPlus variants compared with Cflow: display name -> CflowPlus arguments over the shared settings. The paper
# recipe gets the shared fiber batch size N (Cflow's); the fast recipe keeps its own N (None: the model's default).
DEFAULT_VARIANTS: dict[str, dict[str, Any]] = {
    "CflowPlus paper": {"training_recipe": "paper"},
    "CflowPlus fast": {"training_recipe": "fast", "fiber_batch_size": None},
}


@dataclass(frozen=True)
class SharedSettings:
    """Settings that both models get, identically."""

    backbone: str
    layers: tuple[str, ...]
    image_size: int
    condition_vector: int = 128
    coupling_blocks: int = 8
    clamp_alpha: float = 1.9
    fiber_batch_size: int = 64


@dataclass(frozen=True)
class Variant:
    """One model under test: anomalib's Cflow or a CflowPlus with extra arguments."""

    name: str
    kind: str  # CFLOW or CFLOW_PLUS
    kwargs: dict[str, Any] = field(default_factory=dict)


def default_layers(backbone: str, layers: list[str] | None) -> tuple[str, ...]:
    """The layer names CflowPlus uses for ``backbone`` (its default when ``layers`` is None); Cflow gets the same."""
    return tuple(resolve_layers(backbone, layers, feature_levels(backbone)))


def installed_variants(requested: Mapping[str, Mapping[str, Any]]) -> tuple[list[Variant], list[str]]:
    """Cflow, then every requested CflowPlus variant, keeping only the arguments the installed CflowPlus accepts.

    A variant whose arguments, once the unknown ones are dropped, equal an earlier variant's is skipped (it
    would measure the same model twice). Returns the variants and human-readable notes on what was dropped.
    """
    accepted = set(inspect.signature(CflowPlus.__init__).parameters) - {"self"}
    variants = [Variant(CFLOW_NAME, CFLOW)]
    notes: list[str] = []
    kept_so_far: list[dict[str, Any]] = []
    for name, kwargs in requested.items():
        kept = {key: value for key, value in kwargs.items() if key in accepted}
        dropped = [key for key in kwargs if key not in accepted]
        if dropped:
            notes.append(f"{name}: the installed CflowPlus does not accept {dropped}; ignored.")
        if kept in kept_so_far:
            notes.append(f"{name}: skipped, same CflowPlus arguments as an earlier variant ({kept}).")
            continue
        kept_so_far.append(kept)
        variants.append(Variant(name, CFLOW_PLUS, kept))
    return variants, notes


def shared_encoder_weights(backbone: str, seed: int) -> tuple[dict[str, Tensor], str]:
    """Encoder weights both models get: packaged ImageNet weights where they exist offline, else a seeded random init.

    Returns the full timm model's state dict and a description of where it came from.
    """
    if backbone in PACKAGED_BACKBONES:
        return packaged_state_dict(backbone), "ImageNet weights (packaged, offline)"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        state_dict = timm.create_model(backbone, pretrained=False).state_dict()
    return state_dict, f"random init (seed {seed}), the same for both models: no offline ImageNet weights"


def build_model(variant: Variant, settings: SharedSettings) -> AnomalibModule:
    """Build ``variant`` with the shared settings, a random encoder (load weights with :func:`load_shared_encoder`).

    ``variant.kwargs`` override the shared settings; a ``None`` there leaves the argument at the model's
    default (``"fiber_batch_size": None``: the recipe's own ``N``).
    Both models get the same pre-processor (resize to ``image_size``, ImageNet normalization) and the same
    evaluator (CflowPlus's: image AUROC/F1, pixel AUROC/F1 and AUPRO; Cflow's default lacks AUPRO).
    """
    arguments: dict[str, Any] = {
        "backbone": settings.backbone,
        "layers": list(settings.layers),
        "pre_trained": False,
        "condition_vector": settings.condition_vector,
        "coupling_blocks": settings.coupling_blocks,
        "clamp_alpha": settings.clamp_alpha,
        "fiber_batch_size": settings.fiber_batch_size,
        "pre_processor": AnomalibModule.configure_pre_processor((settings.image_size, settings.image_size)),
        "evaluator": CflowPlus.configure_evaluator(),
        **variant.kwargs,
    }
    arguments = {key: value for key, value in arguments.items() if value is not None}  # None: the model's default
    if variant.kind == CFLOW:
        return Cflow(**arguments)
    return CflowPlus(**arguments)


def training_settings(model: AnomalibModule) -> dict[str, Any]:
    """The recipe a built model trains with: its name, fibers per optimizer step ``N`` and learning rate."""
    if isinstance(model, CflowPlus):
        recipe = getattr(model, "training_recipe", "paper")
        return {"recipe": recipe, "fiber_batch_size": model.fiber_batch_size, "lr": model.lr}
    return {"recipe": "Cflow", "fiber_batch_size": model.model.fiber_batch_size, "lr": model.learning_rate}


def encoder_of(model: AnomalibModule) -> nn.Module:
    """The timm ``features_only`` encoder of a Cflow or CflowPlus model."""
    return model.model.encoder.feature_extractor


def load_shared_encoder(model: AnomalibModule, state_dict: Mapping[str, Tensor], backbone: str) -> None:
    """Load a full-model timm ``state_dict`` into the model's encoder (shapes checked)."""
    load_encoder_weights(encoder_of(model), state_dict, backbone)


def calibrate_for_timing(model: CflowPlus, size: int | tuple[int, int]) -> CflowPlus:
    """Calibrate an untrained CflowPlus on two random images, so that it scores and exports: for timing only.

    A model refuses to score or export before calibration; its time and size do not depend on the constants.
    """
    height, width = (size, size) if isinstance(size, int) else size
    images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    calibrate(model.model, [images], model.device)
    return model


def prepare_for_inference(model: AnomalibModule, image_size: int) -> AnomalibModule:
    """Eval mode; an untrained CflowPlus first gets weights shaped like a trained one's.

    Its ActNorms are initialized on the features of random images, and its couplings' last layers, which start
    at zero (identity couplings), get small random weights: OpenVINO folds a product with a zero matrix away,
    which would time and size a model without half of its subnets.
    """
    if isinstance(model, CflowPlus) and not model.model.normalization_initialized:
        with torch.no_grad():
            model.model.initialize_normalization(model.model.encode(torch.randn(2, 3, image_size, image_size)))
            generator = torch.Generator().manual_seed(0)
            for name, parameter in model.model.decoders.named_parameters():
                if ".subnet.out." in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 1e-2)
        calibrate_for_timing(model, image_size)
    return model.eval()


def parameter_counts(model: AnomalibModule) -> dict[str, int]:
    """``total`` parameters of the torch model and ``trainable`` ones: the decoders' (the optimizer holds those)."""
    total = sum(parameter.numel() for parameter in model.model.parameters())
    trainable = sum(parameter.numel() for parameter in model.model.decoders.parameters() if parameter.requires_grad)
    return {"total": total, "trainable": trainable}


def state_dict_bytes(model: AnomalibModule) -> int:
    """Size of ``torch.save(model.state_dict())``: weights and buffers of the whole Lightning module."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes
