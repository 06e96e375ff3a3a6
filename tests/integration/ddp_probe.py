"""A callback for the DDP test: each process writes what it trained on and a fingerprint of its decoders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class DecoderFingerprint(Callback):
    """At the end of training, write ``rank<N>.json`` into ``$DDP_PROBE_DIR``: world size, images seen, weights."""

    def __init__(self) -> None:
        self.images_seen = 0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        """Count this process's training images."""
        del trainer, pl_module, batch_idx
        self.images_seen += len(batch.image)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write the fingerprint of this process's decoders and calibration."""
        decoders = torch.cat([p.detach().double().flatten() for p in pl_module.model.decoders.parameters()])
        calibration = pl_module.model.anomaly_map
        record = {
            "world_size": trainer.world_size,
            "rank": trainer.global_rank,
            "images_seen": self.images_seen,
            "decoder_sum": decoders.sum().item(),
            "decoder_norm": decoders.norm().item(),
            "layer_max": calibration.layer_max.tolist(),
            "layer_mean": calibration.layer_mean.tolist(),
            "prototypes": pl_module.model.part_types.prototypes.double().sum().item(),
            "skipped_steps": pl_module.decoder_training.skipped_steps,
        }
        directory = Path(os.environ["DDP_PROBE_DIR"])
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
