"""Resume-then-test: test the model a resumed fit trained, not the checkpoint it resumed from.

anomalib's ``Engine.train(ckpt_path=...)`` (``anomalib train --ckpt_path``) resumes the fit from ``ckpt_path`` and
then tests with the same ``ckpt_path``, which would restore the checkpoint it resumed from and report that model's
metrics, not the resumed one's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import TrainerFn

__all__ = ["ResumedFit"]

logger = logging.getLogger(__name__)


class ResumedFit:
    """Remembers the checkpoint a fit resumed from; when the same trainer tests it, keeps the live state."""

    def __init__(self) -> None:
        self.resumed_from: Path | None = None

    def on_load_checkpoint(
        self, trainer: Trainer | None, checkpoint: dict[str, Any], state_dict: Callable[[], dict[str, Any]]
    ) -> None:
        """Note a resume, or keep the resumed weights; called as a checkpoint is loaded, before its weights are.

        Args:
            trainer: The model's trainer, or ``None``.
            checkpoint: The checkpoint being loaded; its ``state_dict`` and callback states are replaced in place.
            state_dict: The model's current ``state_dict``.

        """
        if trainer is None or trainer.ckpt_path is None:
            return
        path = Path(trainer.ckpt_path).resolve()
        if trainer.state.fn == TrainerFn.FITTING:
            self.resumed_from = path
        elif trainer.state.fn == TrainerFn.TESTING and path == self.resumed_from:
            checkpoint["state_dict"] = state_dict()
            saved_callbacks = checkpoint.get("callbacks", {})
            for callback in trainer.callbacks:  # e.g. the post-processor, whose thresholds are callback state too
                if callback.state_key in saved_callbacks:
                    saved_callbacks[callback.state_key] = callback.state_dict()
            logger.info("Testing the model this run trained after resuming from %s, not that checkpoint.", path)
