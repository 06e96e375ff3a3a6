"""Which parts of CflowPlus compute in reduced precision under mixed precision (``torch.autocast``).

Lightning's ``16-mixed`` and ``bf16-mixed`` run the training, validation, test and predict steps under
``torch.autocast``, which computes products (``Linear``, convolutions) in float16 or bfloat16. CflowPlus keeps:

- **in reduced precision**: the coupling subnets' products while training, where nearly all of the training time
  goes (:class:`~.flow.ConditionalSubnet`);
- **in float32**: everything a score depends on. The encoder's features, the log-scales' ``exp``, the
  log-determinant, the log-likelihood (:class:`~.flow.ConditionalAffineCoupling` casts the subnet's output back to
  the fibers' dtype), and every scoring pass: calibration, validation, test, predict and export
  (:meth:`~.torch_model.CflowPlusModel.forward`). A mixed-precision run's scores therefore mean what an exported
  float32 model's scores mean, and its calibration statistics and thresholds are float32.

Rounding the encoder's features to bfloat16 moved a lite1 model's log-likelihoods by up to 0.11 at its stride-32
layer, whose log-likelihoods have a std of 0.14 (``benchmarks/README.md``, mixed precision), and the encoder takes
about 3 % of a training step: it stays in float32.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["float32_region"]


def float32_region(reference: torch.Tensor) -> contextlib.AbstractContextManager:
    """Turn autocast off on ``reference``'s device for a region, so that float32 inputs give float32 results.

    A no-op context when autocast is not enabled there, e.g. in eager float32 runs, exports and on the ``meta``
    device.
    """
    device_type = reference.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()
