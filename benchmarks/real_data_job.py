"""One job of ``real_data.py``, in a fresh process: train one model on one data set, test it and measure it.

Usage (``harness.real_data_job`` does this, for ``real_data.py`` and ``input_size.py``)::

    python -m benchmarks.real_data_job train SPEC.json RESULT.json
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import timm
import torch
from anomalib.callbacks import TilerConfigurationCallback
from anomalib.data import MVTecAD
from anomalib.models import Cflow, Fastflow, Padim, Patchcore
from anomalib.models.components import AnomalibModule
from lightning.pytorch import seed_everything
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from anomalib_cflow_plus import CflowPlus
from anomalib_cflow_plus.backbones import load_encoder_weights, packaged_state_dict
from anomalib_cflow_plus.torch_model import feature_levels
from benchmarks.harness import cpu_engine, dataset_location, demo_datamodule, extract_metrics, spec_key
from benchmarks.jobs import OUT_DIR, peak_rss_mb, serve

LATENCY_IMAGES = 20
PADIM_FEATURES = 100  # anomalib's n_features for resnet18 (of 448 channels); lite1's three levels have 176


def modules_at_strides(backbone: str, strides: tuple[int, ...]) -> list[str]:
    """The timm feature modules of ``backbone`` at the given strides (one per stride, the deepest of each)."""
    by_stride = {level["reduction"]: level["module"] for level in feature_levels(backbone)}
    return [by_stride[stride] for stride in strides]


def build_model(spec: dict[str, Any]) -> tuple[AnomalibModule, nn.Module, str]:
    """The model, its timm ``features_only`` encoder (to load weights into) and the layers it uses.

    Each peer keeps the feature levels it uses by default, by stride: Cflow ``layer2..4`` (strides
    8/16/32), PatchCore ``layer2..3`` (8/16), FastFlow ``out_indices=[1, 2, 3]`` (4/8/16), PaDiM ``layer1..3``
    (4/8/16, keeping ``PADIM_FEATURES`` of their channels at random, as anomalib does for resnet18).
    """
    backbone, size = spec["backbone"], spec["image_size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    common = {
        "pre_processor": AnomalibModule.configure_pre_processor(size),
        "evaluator": CflowPlus.configure_evaluator(),
    }
    name = spec["model"]
    if name.startswith("CflowPlus"):
        recipe = "paper" if "paper" in name else "fast"
        kwargs = {"training_recipe": recipe} if recipe == "paper" else {}
        kwargs |= spec.get("model_kwargs", {})
        model = CflowPlus(backbone=backbone, pre_trained=False, **kwargs, **common)
        return model, model.model.encoder.feature_extractor, ",".join(model.model.layers)
    if name == "Cflow":
        layers = modules_at_strides(backbone, (8, 16, 32))
        model = Cflow(backbone=backbone, layers=layers, pre_trained=False, **common)
        return model, model.model.encoder.feature_extractor, ",".join(layers)
    if name == "Patchcore":
        layers = modules_at_strides(backbone, (8, 16))
        model = Patchcore(backbone=backbone, layers=layers, pre_trained=False, **common)
        return model, model.model.feature_extractor.feature_extractor, ",".join(layers)
    if name == "Padim":
        layers = modules_at_strides(backbone, (4, 8, 16))
        model = Padim(backbone=backbone, layers=layers, n_features=PADIM_FEATURES, pre_trained=False, **common)
        return model, model.model.feature_extractor.feature_extractor, ",".join(layers)
    if name == "Fastflow":
        # FastFlow accepts only resnet18/wide_resnet50_2 by name, and builds its CNN branch (features_only,
        # out_indices [1, 2, 3], LayerNorms and flows sized from the feature info) for them; the encoder
        # it creates is swapped for ours, so every other part is anomalib's own, sized for our encoder.
        create_model = timm.create_model
        with mock.patch.object(timm, "create_model", lambda _name, **kwargs: create_model(backbone, **kwargs)):
            model = Fastflow(backbone="resnet18", pre_trained=False, **common)
        layers = modules_at_strides(backbone, (4, 8, 16))
        return model, model.model.feature_extractor, ",".join(layers)
    msg = f"unknown model {name!r}"
    raise ValueError(msg)


@torch.no_grad()
def latency_ms(model: AnomalibModule, datamodule: MVTecAD) -> float:
    """Median ms of one image through the whole pipeline (pre-processing, model, post-processing), batch 1."""
    model.eval()
    dataset = datamodule.test_data
    times = []
    for index in range(min(LATENCY_IMAGES + 2, len(dataset))):
        image = dataset[index].image.unsqueeze(0)
        start = time.perf_counter()
        model(image)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[2:])  # the first two warm up


def train(spec: dict[str, Any]) -> dict[str, Any]:
    """Train and test one model on one data set; its accuracy, times, peak RSS and checkpoint size."""
    torch.set_num_threads(spec["threads"])
    seed_everything(spec["seed"], workers=True)
    model, encoder, layers = build_model(spec)
    load_encoder_weights(encoder, packaged_state_dict(spec["backbone"]), spec["backbone"])
    root, category = dataset_location(spec["dataset"], Path(spec["data_root"]))
    datamodule = demo_datamodule(root, category, batch_size=16, num_workers=0)
    datamodule.setup(TrainerFn.FITTING)  # set up once, so that the subsample below stays
    train_images = len(datamodule.train_data)
    limit = spec.get("max_train_images")
    if limit is not None and train_images > limit:
        samples = datamodule.train_data.samples
        picked = torch.linspace(0, len(samples) - 1, limit).round().long().tolist()
        datamodule.train_data.samples = samples.iloc[picked].reset_index(drop=True)
    tile = spec.get("tile")  # [tile size, stride] for anomalib's tiler
    callbacks = [TilerConfigurationCallback(enable=True, tile_size=tile[0], stride=tile[1])] if tile else []
    with tempfile.TemporaryDirectory() as run_dir:
        engine = cpu_engine(Path(run_dir), spec["epochs"], callbacks, precision=spec.get("precision", "32-true"))
        start = time.perf_counter()
        engine.fit(model=model, datamodule=datamodule)
        train_s = time.perf_counter() - start
        results = engine.test(model=model, datamodule=datamodule, verbose=False)
        checkpoint = Path(run_dir) / "benchmark.ckpt"
        engine.trainer.save_checkpoint(checkpoint)
        checkpoint_mb = checkpoint.stat().st_size / 2**20
    evidence = {}
    if spec.get("evidence"):  # every image-score rule and calibration of this training (benchmarks/evidence.py)
        from benchmarks.evidence_scoring import score_variants

        figure = OUT_DIR / "evidence" / "maps" / f"{spec_key(spec)}.npz"
        figure.parent.mkdir(parents=True, exist_ok=True)
        evidence = {"variants": score_variants(model, datamodule, figure)}
    return {
        **spec,
        **evidence,
        **extract_metrics(results),
        "layers": layers,
        "train_images": len(datamodule.train_data),
        "train_images_available": train_images,
        "test_images": len(datamodule.test_data),
        "train_s": train_s,
        "test_ms_per_image": latency_ms(model, datamodule),
        "peak_rss_mb": peak_rss_mb(),
        "checkpoint_mb": checkpoint_mb,
    }


if __name__ == "__main__":
    serve({"train": train})
