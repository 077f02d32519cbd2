"""The input checks every public entry point shares, so that the same mistake gets the same message everywhere.

Shape checks go through ``torch._check_value`` (:func:`require`): eagerly a ``ValueError``, in a compiled graph a
runtime assertion that neither breaks the graph nor syncs with the device. Messages name the argument and print what
was given (its shape and dtype: :func:`describe`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from .errors import InputTypeError

__all__ = [
    "all_finite",
    "check_count",
    "check_finite",
    "check_iterations",
    "check_positive",
    "check_same_device",
    "check_tensor",
    "describe",
    "require",
]


def describe(value: Any) -> str:
    """What a value is, for an error message: a tensor's dtype and shape, or else its type.

    Example:
        >>> describe(torch.zeros(2, 3))
        'a torch.float32 tensor of shape (2, 3)'
        >>> describe([1, 2])
        'list'
    """
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def require(condition: Any, message: str) -> None:
    """``torch._check_value``: a ValueError eagerly, a runtime assertion (no graph break) in a compiled graph."""
    torch._check_value(condition, lambda: message)


def check_tensor(
    name: str, value: Any, *, layout: str, ndim: int | tuple[int, ...], kind: str | None = None
) -> torch.Tensor:
    """A tensor of the expected number of dimensions and kind, not empty; else an error naming ``name``.

    Args:
        name: the argument's name, as the caller knows it.
        value: what was given.
        layout: the expected layout in words, for the message (e.g. ``"a 4-D tensor (B, C, H, W)"``).
        ndim: the allowed number(s) of dimensions.
        kind: ``"floating"``, ``"integer"`` or None (any dtype).

    Raises:
        TypeError: not a tensor, or of the wrong kind of dtype.
        ValueError: the wrong number of dimensions, or empty.

    Example:
        >>> check_tensor("unary", torch.zeros(1, 3, 4), layout="(B, C, H, W)", ndim=4)
        Traceback (most recent call last):
        ...
        ValueError: unary must be (B, C, H, W), got shape (1, 3, 4)
    """
    if not isinstance(value, torch.Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    shape = tuple(value.shape)
    if value.ndim not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must be {layout}, got shape {shape}")
    integer = not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    if (kind == "floating" and not value.is_floating_point()) or (kind == "integer" and not integer):
        article = "an" if kind == "integer" else "a"
        raise InputTypeError(f"{name} must be {article} {kind} tensor, got dtype {value.dtype} (shape {shape})")
    require(value.numel() > 0, f"{name} must not be empty, got shape {shape}")  # (symbolic sizes: no graph break)
    return value


def check_same_device(name: str, value: torch.Tensor, other_name: str, device: torch.device) -> None:
    """``value`` must be on ``device`` (``other_name``'s, named in the message: a plural takes "are")."""
    if value.device != device:
        verb = "are" if other_name.endswith("s") else "is"
        raise ValueError(f"{name} is on {value.device} but {other_name} {verb} on {device}")


def check_finite(name: str, value: torch.Tensor) -> None:
    """Refuse a tensor holding NaN or Inf (one reduction, see :func:`all_finite`)."""
    if not all_finite(value):
        raise ValueError(f"{name} {tuple(value.shape)} contains NaN or Inf")


def check_positive(name: str, value: Any) -> float:
    """A finite real number > 0 (not a bool), as a float.

    Example:
        >>> check_positive("theta", 3)
        3.0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputTypeError(f"{name} must be a finite number > 0, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_count(name: str, value: Any, minimum: int = 0) -> int:
    """A count: an integer >= ``minimum`` (not a bool).

    Example:
        >>> check_count("max_size", 512, minimum=1)
        512
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_iterations(num_iterations: Any) -> int:
    """A number of mean-field iterations: an integer >= 0 (not a bool).

    Example:
        >>> check_iterations(5)
        5
    """
    return check_count("num_iterations", num_iterations)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or Inf (one reduction pass, no tensor-sized temporary)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(low) & torch.isfinite(high))
