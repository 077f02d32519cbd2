"""The ``crfasrnn`` operator namespace: how this package defines a ``torch.library`` operator.

:func:`operator` defines an operator from its schema and registers one kernel for every device
(``CompositeExplicitAutograd``); fake kernels and autograd are added with ``torch.library.register_fake`` and
``torch.library.register_autograd``, as for any custom operator.

Why not ``torch.library.custom_op``: it wraps every kernel in ``torch._disable_dynamo``, which imports ``torch._dynamo``
(about 0.8 s) at the first call of any operator, in every process, although nothing is being compiled. Here the kernel
is kept out of dynamo's reach only where dynamo is loaded at all: a ``torch.compile`` in progress needs it imported,
so where it is not, no graph can be tracing into the kernel.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import torch

__all__ = ["LIBRARY", "operator"]

LIBRARY = torch.library.Library("crfasrnn", "DEF")


def _outside_dynamo(fn: Callable) -> Callable:
    disabled: list[Callable] = []

    @functools.wraps(fn)
    def kernel(*args):
        if "torch._dynamo" not in sys.modules:  # no compilation can be running
            return fn(*args)
        if not disabled:
            disabled.append(sys.modules["torch._dynamo"].disable(fn, recursive=True))
        return disabled[0](*args)

    return kernel


def operator(schema: str) -> Callable[[Callable], Callable]:
    """Decorator: define ``crfasrnn::<name>`` from ``schema`` ("name(Tensor x, ...) -> Tensor") with the function as
    its kernel on every device; returns the function (call the operator itself through ``torch.ops.crfasrnn``)."""
    name = schema.split("(", 1)[0]

    def decorator(fn: Callable) -> Callable:
        LIBRARY.define(schema)
        LIBRARY.impl(name, _outside_dynamo(fn), "CompositeExplicitAutograd")
        return fn

    return decorator
