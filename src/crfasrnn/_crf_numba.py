"""Compiled CPU loops (numba) for the CRF layer's backward pass: the gradient through the softmax in one pass.

Per iteration of the mean-field backward, the gradient of the probabilities ``d`` (formed from the two transposed
messages and per-class factors, or given) becomes the gradient of the previous scores ``p ⊙ (d − Σ_c p ⊙ d)``, which is
written where the next transposed filtering reads it and added to the unary's gradient. In torch these are four or five
passes over tensors of the image's size; here one. Compiled functions are cached on disk like the lattice's.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from ._parallel import parallel_kernel

__all__ = ["softmax_backward"]


@numba.njit(cache=True, nogil=True, parallel=True)
def _softmax_backward(grad_p, factors, r1, r2, p, g_out, grad_u):  # pragma: no cover - compiled
    """``g_out = p ⊙ (d − Σ_c p ⊙ d)`` per row and ``grad_u += g_out`` (where ``grad_u`` is not empty).

    ``d`` is ``grad_p``, or, where ``factors`` (2, C) is not empty, ``r1 ⊙ factors[0] + r2 ⊙ factors[1]``.
    """
    num_points, num_channels = p.shape
    from_r = factors.shape[0] > 0
    accumulate = grad_u.shape[0] > 0
    block = 256
    for blk in numba.prange((num_points + block - 1) // block):
        d = np.empty(num_channels, dtype=p.dtype)
        for i in range(blk * block, min(num_points, (blk + 1) * block)):
            pi = p[i]
            if from_r:
                a = r1[i]
                b = r2[i]
                f0 = factors[0]
                f1 = factors[1]
                for c in range(num_channels):
                    d[c] = a[c] * f0[c] + b[c] * f1[c]
            else:
                gi = grad_p[i]
                for c in range(num_channels):
                    d[c] = gi[c]
            dot = pi[0] * d[0]
            for c in range(1, num_channels):
                dot += pi[c] * d[c]
            o = g_out[i]
            for c in range(num_channels):
                o[c] = pi[c] * (d[c] - dot)
            if accumulate:
                gu = grad_u[i]
                for c in range(num_channels):
                    gu[c] += o[c]


@parallel_kernel
def softmax_backward(
    p: torch.Tensor,
    g_out: torch.Tensor,
    grad_u: torch.Tensor | None,
    *,
    grad_p: torch.Tensor | None = None,
    r: tuple[torch.Tensor, torch.Tensor] | None = None,
    factors: torch.Tensor | None = None,
) -> None:
    """The gradient through ``p = softmax(q, dim=1)`` for (N, C) CPU tensors, written into ``g_out`` (rows may be
    padded) and added to ``grad_u`` (contiguous, or None).

    The gradient of ``p`` is ``grad_p`` (N, C), or ``r[0] ⊙ factors[0] + r[1] ⊙ factors[1]`` for two (N, C) ``r``
    and (2, C) ``factors``.
    """
    dtype = p.detach().numpy().dtype
    none = np.empty((0, 0), dtype=dtype)

    def array(t: torch.Tensor | None) -> np.ndarray:
        return none if t is None else t.detach().numpy()

    r1, r2 = (None, None) if r is None else r
    _softmax_backward(array(grad_p), array(factors), array(r1), array(r2), array(p), array(g_out), array(grad_u))
