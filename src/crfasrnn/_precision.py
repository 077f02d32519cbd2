"""The precision policy of the CRF: float32 arithmetic (float64 kept), half inputs returned in their dtype.

The lattice's arithmetic and the mean field's exponentials need float32: half and bfloat16 inputs are computed in
float32 and returned in their own dtype, except under autocast, where the result is float32 (as torch's
precision-sensitive operations, e.g. softmax, return under autocast).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["compute_dtype", "precision"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the CRF computes in: float64 stays, everything else (half, bfloat16) is computed in float32.

    Example:
        >>> compute_dtype(torch.float16), compute_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def precision(unary: torch.Tensor) -> Iterator[tuple[torch.dtype, torch.dtype]]:
    """Yields (compute dtype, output dtype) with autocast off inside: float32 compute (float64 stays), half inputs
    returned in their dtype, float32 returned under autocast (as torch's precision-sensitive operations do)."""
    device_type = unary.device.type
    autocast = device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)
    dtype = compute_dtype(unary.dtype)
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        yield dtype, (dtype if autocast else unary.dtype)
