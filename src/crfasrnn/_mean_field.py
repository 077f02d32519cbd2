"""Mean-field inference of a dense CRF as ``torch.library`` operators: ``crfasrnn::mean_field`` and its backward.

``crfasrnn::mean_field`` runs T iterations ``p_t = softmax(q_{t-1})``, ``q_t = u − Σ_k (n_k ⊙ K_k p_t) A_k`` from
``q_0 = u`` over (B, N, C) scores in point layout, for any number of kernels k: each a built lattice (its tensors, see
:mod:`crfasrnn.lattice`; the lattices are passed as one flat list, :data:`~crfasrnn.lattice.FIELDS` tensors
each) and a (C, C) mixing matrix ``A_k`` (for CRF-RNN, ``A = (M W)ᵀ`` with compatibility M and kernel weights W). Where
gradients are wanted it also returns every iteration's probabilities — what its backward operator,
``crfasrnn::mean_field_backward``, needs and all it needs: the two are joined with ``register_autograd``, and both
have fake kernels, so ``torch.compile`` and ``torch.export`` see opaque nodes and never trace into the compiled loops.

Diagonal matrices (the Potts-like models of a fresh layer) are applied as per-class scales, in one fused pass for two
kernels on the CPU; the operators find out themselves (a host-side test inside the kernel, so the caller never syncs).

The operators compute in the dtype they are given (float32 or float64); :func:`crfasrnn.crf.crf_rnn` casts.
"""

from __future__ import annotations

import torch

from ._library import operator
from .lattice import FIELDS, PermutohedralLattice, filter_each, filter_sum, mode_scales, softmax_rows, values_buffer

try:  # numba is optional: torch operations are used without it
    from . import _crf_numba
except ImportError:  # pragma: no cover - exercised only where numba is absent
    _crf_numba = None  # type: ignore[assignment]

__all__ = ["mean_field", "mean_field_backward", "softmax"]


def _lattices(tensors, mixing, num_points) -> list[PermutohedralLattice]:
    size = len(FIELDS)
    if len(tensors) != size * len(mixing) or not mixing:
        raise ValueError(
            f"mean field needs {size} lattice tensors per mixing matrix and at least one kernel, got "
            f"{len(tensors)} tensors and {len(mixing)} matrices"
        )
    return [
        PermutohedralLattice.from_tensors(tensors[k * size : (k + 1) * size], num_points) for k in range(len(mixing))
    ]


@operator(
    "mean_field(Tensor unary, Tensor[] lattices, Tensor[] mixing, int[] normalizations, int num_iterations, "
    "bool save_probs) -> (Tensor, Tensor)"
)
def mean_field(
    unary: torch.Tensor,
    lattices: list[torch.Tensor],
    mixing: list[torch.Tensor],
    normalizations: list[int],
    num_iterations: int,
    save_probs: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean field over (B, N, C) unary scores; returns the scores q_T (B, N, C) and, where ``save_probs``, every
    iteration's probabilities (T, B·N, C) (else an empty tensor)."""
    batch, n, c = unary.shape
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1 in the operator, got {num_iterations}")
    u = unary.reshape(batch * n, c).contiguous()
    kernels = _lattices(lattices, mixing, n)
    modes = _modes(normalizations, mixing)
    factors = _factors(mixing)
    if save_probs:
        q, probs = _forward_saving(u, factors, kernels, modes, batch, num_iterations)
    else:
        q, probs = _mean_field_inference(u, kernels, factors, modes, num_iterations, batch), u.new_empty(0)
    return q.view(batch, n, c), probs


@torch.library.register_fake("crfasrnn::mean_field")
def _(unary, lattices, mixing, normalizations, num_iterations, save_probs):
    b, n, c = unary.shape
    probs = unary.new_empty((num_iterations, b * n, c) if save_probs else (0,))
    return torch.empty_like(unary, memory_format=torch.contiguous_format), probs


@operator(
    "mean_field_backward(Tensor grad, Tensor probs, Tensor[] lattices, Tensor[] mixing, int[] normalizations, "
    "bool need_unary, bool[] need_mixing) -> (Tensor, Tensor[])"
)
def mean_field_backward(
    grad: torch.Tensor,
    probs: torch.Tensor,
    lattices: list[torch.Tensor],
    mixing: list[torch.Tensor],
    normalizations: list[int],
    need_unary: bool,
    need_mixing: list[bool],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The gradients of :func:`mean_field`'s scores with respect to the unary (B, N, C) and each (C, C) mixing matrix;
    those not needed are empty tensors."""
    if probs.numel() == 0:
        raise RuntimeError(
            "crfasrnn::mean_field_backward needs the probabilities of a forward run with save_probs=True"
        )
    batch, n, c = grad.shape
    kernels = _lattices(lattices, mixing, n)
    modes = _modes(normalizations, mixing)
    grad_u, grads = _backward(grad.reshape(batch * n, c), probs, mixing, kernels, modes, batch, need_unary, need_mixing)
    return (
        grad.new_empty(0) if grad_u is None else grad_u.view(batch, n, c),
        [grad.new_empty(0) if g is None else g for g in grads],
    )


@torch.library.register_fake("crfasrnn::mean_field_backward")
def _(grad, probs, lattices, mixing, normalizations, need_unary, need_mixing):
    def maybe(need, like):
        return torch.empty_like(like, memory_format=torch.contiguous_format) if need else grad.new_empty(0)

    return maybe(need_unary, grad), [maybe(need, a) for need, a in zip(need_mixing, mixing)]


def _setup(ctx, inputs, output):
    _, lattices, mixing, normalizations, _, _ = inputs
    ctx.save_for_backward(output[1], *mixing, *lattices)
    ctx.num_kernels = len(mixing)
    ctx.normalizations = list(normalizations)
    # the probabilities are for backward only: no gradient flows into them, and none is made up (a zero tensor of
    # T·B·N·C values) for backward
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _autograd_backward(ctx, grad_q, grad_probs):
    probs, *rest = ctx.saved_tensors
    k = ctx.num_kernels
    mixing, lattices = rest[:k], rest[k:]
    need_u, _, need_mixing = ctx.needs_input_grad[:3]
    need_mixing = [bool(x) for x in need_mixing]
    if grad_q is None:  # no gradient reached the scores (grads are not materialised): none flows back
        return None, [None] * len(lattices), [None] * k, None, None, None
    grad_u, grads = torch.ops.crfasrnn.mean_field_backward(
        grad_q.contiguous(), probs, lattices, mixing, ctx.normalizations, bool(need_u), need_mixing
    )
    return (
        grad_u if need_u else None,
        [None] * len(lattices),
        [g if need else None for g, need in zip(grads, need_mixing)],
        None,
        None,
        None,
    )


torch.library.register_autograd("crfasrnn::mean_field", _autograd_backward, setup_context=_setup)


def _no_second_derivative(ctx, *grads):
    raise RuntimeError(
        "the CRF's backward is first-order only: second derivatives (create_graph=True, then backward "
        "again) are not supported"
    )


torch.library.register_autograd(
    "crfasrnn::mean_field_backward", _no_second_derivative, setup_context=lambda ctx, inputs, output: None
)


def _modes(normalizations, mixing) -> list[int]:
    if len(normalizations) != len(mixing):
        raise ValueError(
            f"mean field needs one normalisation mode per kernel, got {len(normalizations)} for {len(mixing)} kernels"
        )
    for mode in normalizations:
        mode_scales(mode)  # validates
    return [int(m) for m in normalizations]


def _factors(mixing):
    """The mixing matrices, or their diagonals where all are diagonal (applied as per-class scales)."""
    return [a.diagonal() for a in mixing] if all(_is_diagonal(a) for a in mixing) else list(mixing)


def _forward_saving(u, factors, kernels, modes, batch, num_iterations):
    """The iterations, keeping every iteration's probabilities (what backward needs) in one block allocated up front:
    one large mapping that goes back to the system when freed, instead of a heap fragmented by tensor-sized blocks."""
    probs = torch.empty((num_iterations, *u.shape), dtype=u.dtype, device=u.device)
    q = torch.empty_like(u)
    softmax_rows(u, probs[0])
    for t in range(num_iterations):  # each pass also writes the next iteration's probabilities
        last = t == num_iterations - 1
        _filter_and_update(probs[t], u, factors, kernels, modes, batch, q=q, softmax_out=None if last else probs[t + 1])
    return q, probs


def _backward(grad, probs, mixing, kernels, modes, batch, need_u, need_mixing):
    """All the iterations' backward, for (B·N, C) ``grad``: with ``r_k = K_kᵀ (n_k ⊙ G)`` (one transposed filtering
    per kernel), ``∂L/∂p = −Σ_k r_k A_kᵀ`` and ``∂L/∂A_k = −pᵀ r_k`` (channel mixing commutes with the per-channel
    filter), ``∂L/∂u = Σ_t G_t`` and, through the softmax, ``G_{t-1} = p ⊙ (∂L/∂p − Σ_c p ⊙ ∂L/∂p)``. Buffers are
    reused across the iterations and the unary's gradient (one term per iteration) is summed in place."""
    c = grad.shape[1]
    shape = (batch, -1, c)
    grad_u = grad.contiguous().clone() if need_u else None
    g = values_buffer(batch, grad.shape[0] // batch, c, like=grad).view(-1, c)  # read by the filters
    g.copy_(grad)
    r = [grad.new_empty(grad.shape) for _ in kernels]  # r_k (contiguous)
    grads_a = [
        a.new_zeros((c, c)) if need else None for a, need in zip(mixing, need_mixing)
    ]  # pᵀ r, negated at the end
    diagonal = all(_is_diagonal(a) for a in mixing)
    if diagonal:  # ∂L/∂p = Σ_k r_k ⊙ f_k
        factors, neg_a_t = -torch.stack([a.diagonal() for a in mixing]), None
    else:  # ∂L/∂p = −Σ_k r_k A_kᵀ
        factors, neg_a_t = None, [-a.t() for a in mixing]
    for t in range(probs.shape[0] - 1, -1, -1):
        p = probs[t]
        # r_k = K_kᵀ (n_k ⊙ G) for every kernel: the messages' gradients are −r_k
        filter_each(g.view(shape), kernels, transpose=True, out=[x.view(shape) for x in r], modes=modes)
        for ga, rk in zip(grads_a, r):
            if ga is not None:
                ga.addmm_(p.t(), rk)
        grad_p = None
        if neg_a_t is not None:
            grad_p = torch.mm(r[0], neg_a_t[0])
            for rk, na in zip(r[1:], neg_a_t[1:]):
                grad_p.addmm_(rk, na)
        _softmax_backward_into(p, g, grad_u, grad_p=grad_p, r=r, factors=factors)  # G_{t-1}, and u's share
    return grad_u, [None if ga is None else ga.neg_() for ga in grads_a]


def _mean_field_inference(u, kernels, factors, modes, num_iterations: int, batch: int) -> torch.Tensor:
    """The iterations without autograd, in two buffers reused by every iteration.

    Same arithmetic as the differentiable loop. One pass per iteration slices the messages, mixes them into the
    scores and writes the scores' softmax over ``p`` (the splats have read ``p`` by then) for the next iteration;
    only the last iteration stores the scores. Reusing the buffers matters on CPU: fresh tensors of tens of megabytes
    come from the operating system page by page, and at 1000×750 that costs more than the filtering.
    """
    q = torch.empty_like(u)
    p = values_buffer(1, u.shape[0], u.shape[1], like=u)[0]  # rows padded where the filter reads them faster
    softmax_rows(u, p)
    for t in range(num_iterations):
        last = t == num_iterations - 1
        _filter_and_update(p, u, factors, kernels, modes, batch, q=q, softmax_out=None if last else p)
    return q


def _filter_and_update(p, u, factors, kernels, modes, batch, *, q, softmax_out=None):
    """One mean-field step after the softmax, without autograd: ``q = u − Σ_k (n_k ⊙ K_k p) A_k``.

    ``A_k`` are (C, C) matrices or (C,) per-class scales; two kernels' messages are sliced and mixed in one pass where
    the back end can (see :func:`~crfasrnn.lattice.filter_sum`). ``q`` receives the result and is returned; where
    ``softmax_out`` (which may be ``p``) is given, it receives ``softmax(q)`` instead and ``q`` is not stored.
    """
    points = p.view(batch, -1, p.shape[1])
    soft = None if softmax_out is None else softmax_out.view(points.shape)
    filter_sum(
        points,
        kernels,
        [-f for f in factors],
        base=u.view(points.shape),
        out=q.view(points.shape),
        softmax_out=soft,
        keep_sum=soft is None,
        modes=modes,
    )
    return q


def softmax(scores: torch.Tensor) -> torch.Tensor:
    """``softmax(scores, dim=-1)`` of (..., C) scores in point layout: the marginals of mean-field scores (see
    :func:`_softmax_into` for the fast path)."""
    flat = scores.reshape(-1, scores.shape[-1])
    out = torch.empty(flat.shape, dtype=scores.dtype, device=scores.device)
    softmax_rows(flat, out)
    return out.view(scores.shape)


def _softmax_backward_into(p, g_out, grad_u, *, grad_p=None, r=None, factors=None) -> None:
    """``g_out = p ⊙ (d − Σ_c p ⊙ d)`` (the gradient through ``p = softmax(q, dim=1)``) and ``grad_u += g_out``.

    ``d`` is ``grad_p``, or ``Σ_k r[k] ⊙ factors[k]`` for (K, C) factors; ``grad_u`` may be None. On the CPU with
    numba, one compiled pass (which forms ``d`` itself for two kernels); otherwise torch operations.
    """
    if grad_p is None and len(r) != 2:
        grad_p = torch.mul(r[0], factors[0])
        for rk, fk in zip(r[1:], factors[1:]):
            grad_p.addcmul_(rk, fk)
    if _crf_numba is not None and p.device.type == "cpu":
        pair = None if grad_p is not None else (r[0], r[1])
        _crf_numba.softmax_backward(p, g_out, grad_u, grad_p=grad_p, r=pair, factors=None if pair is None else factors)
        return
    if grad_p is None:
        grad_p = torch.mul(r[0], factors[0]).addcmul_(r[1], factors[1])
    try:
        g = torch.ops.aten._softmax_backward_data(grad_p, p.contiguous(), 1, p.dtype)
    except (AttributeError, RuntimeError):  # pragma: no cover - an ATen without the op
        g = grad_p.sub((grad_p * p).sum(dim=1, keepdim=True)).mul_(p)
    g_out.copy_(g)
    if grad_u is not None:
        grad_u.add_(g)


def _is_diagonal(matrix: torch.Tensor) -> bool:
    return bool(torch.count_nonzero(matrix - torch.diag_embed(matrix.diagonal())) == 0)
