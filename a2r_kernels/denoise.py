"""Placeholder: denoise_step is being written (issue 3)."""
from typing import NamedTuple

import torch


class DenoiseResult(NamedTuple):
    x0: torch.Tensor
    confidence: torch.Tensor
    transferred: torch.Tensor


def denoise_step(*args, **kwargs):  # pragma: no cover - replaced
    raise NotImplementedError("denoise_step is not written yet")
