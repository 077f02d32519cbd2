"""Which lattice back end runs where, and the memory layout the numba back end reads fastest.

Two back ends implement the lattice: vectorised torch operations (CPU and CUDA) and, on the CPU where numba is
installed, JIT-compiled parallel loops (:mod:`._numba`). :func:`resolve_backend` turns a back-end name into the one
that runs; :func:`values_buffer` and :func:`check_buffer` describe the tensors the numba filters read without a copy.
"""

from __future__ import annotations

from typing import Literal

import torch

try:  # numba is optional: the torch path is used without it
    from . import _numba as numba_kernels
except ImportError:  # pragma: no cover - exercised only where numba is absent
    numba_kernels = None  # type: ignore[assignment]

__all__ = [
    "Backend",
    "check_buffer",
    "empty_cache",
    "numba_available",
    "numba_kernels",
    "resolve_backend",
    "softmax_rows",
    "values_buffer",
]

Backend = Literal["auto", "torch", "numba"]


def check_buffer(name: str, buffer: torch.Tensor, like: torch.Tensor, *, padded_rows: bool = False) -> None:
    """An output buffer must be a contiguous tensor of ``like``'s shape, dtype and device.

    With ``padded_rows``, a (B, N, C) buffer may also be a column slice of a wider contiguous tensor (its rows
    contiguous and equally spaced), as :func:`values_buffer` makes.
    """
    layout_ok = buffer.is_contiguous() or (padded_rows and _has_padded_rows(buffer))
    if buffer.shape != like.shape or buffer.dtype != like.dtype or buffer.device != like.device or not layout_ok:
        kind = "have contiguous (or padded) rows" if padded_rows else "be contiguous"
        raise ValueError(
            f"{name} must match values {tuple(like.shape)} {like.dtype} on {like.device} and {kind}, got "
            f"{tuple(buffer.shape)} {buffer.dtype} on {buffer.device}" + ("" if layout_ok else " (not contiguous)")
        )


def _has_padded_rows(tensor: torch.Tensor) -> bool:
    """Whether a (..., C) tensor is a stack of contiguous, equally spaced, non-overlapping rows."""
    if tensor.numel() == 0 or tensor.stride(-1) != 1:
        return False
    try:
        rows = tensor.view(-1, tensor.shape[-1])
    except RuntimeError:
        return False
    return rows.shape[0] == 1 or rows.stride(0) >= rows.shape[1]


def values_buffer(batch: int, num_points: int, channels: int, *, like: torch.Tensor) -> torch.Tensor:
    """A zero (B, N, C) tensor laid out as the filters read fastest, for values filtered again and again.

    On the numba back end the channel loops work in blocks of 8, so values whose rows are padded to a multiple of 8
    channels are read without a copy: the tensor returned is then a column slice of a wider zero tensor (its padding
    must stay finite; :func:`filter_sum` writes only the first C channels). Elsewhere it is a plain contiguous tensor.

    Args:
        batch, num_points, channels: the shape (B, H·W, C) in point layout.
        like: a tensor whose dtype and device the buffer takes.

    Example:
        >>> p = values_buffer(1, 6, 21, like=torch.empty(0))
        >>> p.shape, p.stride()
        (torch.Size([1, 6, 21]), (144, 24, 1))
    """
    width = channels
    if numba_kernels is not None and like.device.type == "cpu":
        width = numba_kernels.padded_width(channels)
    return torch.zeros(batch, num_points, width, dtype=like.dtype, device=like.device)[..., :channels]


def empty_cache() -> int:
    """Release the idle scratch buffers the numba back end keeps between filterings (at most 128 MB).

    Returns:
        The number of bytes released (0 without numba).

    Example:
        >>> empty_cache() >= 0
        True
    """
    return numba_kernels._SCRATCH.clear() if numba_kernels is not None else 0


def numba_available() -> bool:
    """Whether the numba CPU back end can be used."""
    return numba_kernels is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """The back end ``"auto"``, ``"torch"`` or ``"numba"`` stands for on ``device``: numba on CPU where installed.

    Raises:
        ValueError: an unknown name, or numba asked for where it cannot run.
    """
    if backend not in ("auto", "torch", "numba"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'numba', got {backend!r}")
    if backend == "numba" and (numba_kernels is None or device.type != "cpu"):
        raise ValueError("the numba back end needs numba installed and tensors on the CPU")
    if backend == "auto":
        return "numba" if numba_kernels is not None and device.type == "cpu" else "torch"
    return backend


def softmax_rows(logits: torch.Tensor, out: torch.Tensor) -> None:
    """``out = softmax(logits, dim=1)`` of (N, C) rows, without allocating (``out`` may have padded rows).

    On the CPU in float32 with numba, one compiled pass (torch's softmax over a few channels is slow: 55 ms for 2.1 M
    points of 2 classes); otherwise torch's.

    Example:
        >>> x = torch.randn(5, 3)
        >>> y = torch.empty(5, 3)
        >>> softmax_rows(x, y)
        >>> torch.allclose(y, torch.softmax(x, dim=1))
        True
    """
    if (
        numba_kernels is not None
        and logits.device.type == "cpu"
        and logits.dtype == out.dtype == torch.float32
        and logits.stride(1) == 1
        and out.stride(1) == 1
    ):
        numba_kernels.softmax_rows(logits, out)
        return
    if not out.is_contiguous():  # the out= overload below would write it as if it were contiguous
        out.copy_(torch.softmax(logits, dim=1))  # faster than torch.softmax(..., out=out) into padded rows
        return
    try:
        torch.ops.aten._softmax.out(logits, 1, False, out=out)
    except (AttributeError, RuntimeError):  # pragma: no cover - an ATen without the out= overload
        out.copy_(torch.softmax(logits, dim=1))
