"""Mean-field inference of a dense CRF as ``torch.library`` operators: ``crfasrnn::mean_field`` and its backward.

``crfasrnn::mean_field`` runs T iterations ``p_t = softmax(q_{t-1})``, ``q_t = u − (n_s ⊙ K_s p_t) A_s − (n_b ⊙ K_b
p_t) A_b`` from ``q_0 = u`` over (B, N, C) scores in point layout, with two built lattices (their tensors, see
:mod:`crfasrnn.lattice._ops`) and two (C, C) mixing matrices ``A``. Where gradients are wanted it also returns every
iteration's probabilities — what its backward operator, ``crfasrnn::mean_field_backward``, needs and all it needs: the
two are joined with ``register_autograd``, and both have fake kernels, so ``torch.compile`` and ``torch.export`` see two
opaque nodes and never trace into the compiled loops.

Diagonal matrices (the Potts-like models of a fresh layer) are applied as per-class scales in one fused pass; the
operators find out themselves (a host-side test inside the kernel, so the caller never syncs).

The operators compute in the dtype they are given (float32 or float64); :func:`crfasrnn.crf.crf_rnn` casts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._library import operator
from .lattice import PermutohedralLattice, filter_each, filter_sum, values_buffer

try:  # numba is optional: torch operations are used without it
    from . import _crf_numba
except ImportError:  # pragma: no cover - exercised only where numba is absent
    _crf_numba = None

__all__ = ["mean_field", "mean_field_backward"]


def _lattices(spatial, bilateral, num_points):
    return PermutohedralLattice.from_tensors(spatial, num_points), PermutohedralLattice.from_tensors(bilateral, num_points)


@operator("mean_field(Tensor unary, Tensor[] spatial, Tensor[] bilateral, Tensor a_s, Tensor a_b, int num_iterations, "
          "bool save_probs) -> (Tensor, Tensor)")
def mean_field(
    unary: torch.Tensor,
    spatial: list[torch.Tensor],
    bilateral: list[torch.Tensor],
    a_s: torch.Tensor,
    a_b: torch.Tensor,
    num_iterations: int,
    save_probs: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean field over (B, N, C) unary scores; returns the scores q_T (B, N, C) and, where ``save_probs``, every
    iteration's probabilities (T, B·N, C) (else an empty tensor)."""
    batch, n, c = unary.shape
    u = unary.reshape(batch * n, c).contiguous()
    lat_s, lat_b = _lattices(spatial, bilateral, n)
    diagonal = _is_diagonal(a_s) and _is_diagonal(a_b)
    f_s, f_b = (a_s.diagonal(), a_b.diagonal()) if diagonal else (a_s, a_b)
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1 in the operator, got {num_iterations}")
    if save_probs:
        q, probs = _forward_saving(u, f_s, f_b, lat_s, lat_b, batch, num_iterations)
    else:
        q, probs = _mean_field_inference(u, lat_s, lat_b, f_s, f_b, num_iterations, batch), u.new_empty(0)
    return q.view(batch, n, c), probs


@torch.library.register_fake("crfasrnn::mean_field")
def _(unary, spatial, bilateral, a_s, a_b, num_iterations, save_probs):
    b, n, c = unary.shape
    probs = unary.new_empty((num_iterations, b * n, c) if save_probs else (0,))
    return torch.empty_like(unary, memory_format=torch.contiguous_format), probs


@operator("mean_field_backward(Tensor grad, Tensor probs, Tensor[] spatial, Tensor[] bilateral, Tensor a_s, Tensor a_b, "
          "bool need_unary, bool need_a_s, bool need_a_b) -> (Tensor, Tensor, Tensor)")
def mean_field_backward(
    grad: torch.Tensor,
    probs: torch.Tensor,
    spatial: list[torch.Tensor],
    bilateral: list[torch.Tensor],
    a_s: torch.Tensor,
    a_b: torch.Tensor,
    need_unary: bool,
    need_a_s: bool,
    need_a_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of :func:`mean_field`'s scores with respect to the unary (B, N, C) and the two (C, C) matrices;
    those not needed are empty tensors."""
    if probs.numel() == 0:
        raise RuntimeError("crfasrnn::mean_field_backward needs the probabilities of a forward run with save_probs=True")
    batch, n, c = grad.shape
    lat_s, lat_b = _lattices(spatial, bilateral, n)
    diagonal = _is_diagonal(a_s) and _is_diagonal(a_b)
    grad_u, grad_s, grad_b = _backward(grad.reshape(batch * n, c), probs, a_s, a_b, (lat_s, lat_b), batch, diagonal,
                                       (need_unary, need_a_s, need_a_b))
    empty = grad.new_empty(0)
    return (empty if grad_u is None else grad_u.view(batch, n, c), empty if grad_s is None else grad_s,
            empty.clone() if grad_b is None else grad_b)


@torch.library.register_fake("crfasrnn::mean_field_backward")
def _(grad, probs, spatial, bilateral, a_s, a_b, need_unary, need_a_s, need_a_b):
    def maybe(need, like):
        return torch.empty_like(like, memory_format=torch.contiguous_format) if need else grad.new_empty(0)

    return maybe(need_unary, grad), maybe(need_a_s, a_s), maybe(need_a_b, a_b)


def _setup(ctx, inputs, output):
    unary, spatial, bilateral, a_s, a_b, num_iterations, save_probs = inputs
    ctx.save_for_backward(output[1], a_s, a_b, *spatial, *bilateral)
    ctx.num_lattice = (len(spatial), len(bilateral))


def _autograd_backward(ctx, grad_q, grad_probs):
    probs, a_s, a_b, *lattices = ctx.saved_tensors
    ns, nb = ctx.num_lattice
    spatial, bilateral = lattices[:ns], lattices[ns:ns + nb]
    need_u, _, _, need_s, need_b = ctx.needs_input_grad[:5]
    grad_u, grad_s, grad_b = torch.ops.crfasrnn.mean_field_backward(
        grad_q.contiguous(), probs, spatial, bilateral, a_s, a_b, bool(need_u), bool(need_s), bool(need_b))
    return (grad_u if need_u else None, [None] * ns, [None] * nb, grad_s if need_s else None,
            grad_b if need_b else None, None, None)


torch.library.register_autograd("crfasrnn::mean_field", _autograd_backward, setup_context=_setup)


def _no_second_derivative(ctx, *grads):
    raise RuntimeError("the CRF's backward is first-order only: second derivatives (create_graph=True, then backward "
                       "again) are not supported")


torch.library.register_autograd("crfasrnn::mean_field_backward", _no_second_derivative,
                                setup_context=lambda ctx, inputs, output: None)


def _forward_saving(u, f_s, f_b, spatial, bilateral, batch, num_iterations):
    """The iterations, keeping every iteration's probabilities (what backward needs) in one block allocated up front:
    one large mapping that goes back to the system when freed, instead of a heap fragmented by tensor-sized blocks."""
    probs = torch.empty((num_iterations, *u.shape), dtype=u.dtype, device=u.device)
    q = torch.empty_like(u)
    _softmax_into(u, probs[0])
    for t in range(num_iterations):  # each pass also writes the next iteration's probabilities
        last = t == num_iterations - 1
        _filter_and_update(probs[t], u, f_s, f_b, spatial, bilateral, batch, q=q,
                           softmax_out=None if last else probs[t + 1])
    return q, probs


def _backward(grad, probs, a_s, a_b, lattices, batch, diagonal, needs):
    """All the iterations' backward, for (B·N, C) ``grad``: with ``r = Kᵀ (n ⊙ G)`` (one transposed filtering per
    kernel), ``∂L/∂p = −(r_s A_sᵀ + r_b A_bᵀ)`` and ``∂L/∂A = −pᵀ r`` (channel mixing commutes with the per-channel
    filter), ``∂L/∂u = Σ_t G_t`` and, through the softmax, ``G_{t-1} = p ⊙ (∂L/∂p − Σ_c p ⊙ ∂L/∂p)``. Buffers are
    reused across the iterations and the unary's gradient (one term per iteration) is summed in place."""
    need_u, need_s, need_b = needs
    c = grad.shape[1]
    shape = (batch, -1, c)
    grad_u = grad.contiguous().clone() if need_u else None
    g = values_buffer(batch, grad.shape[0] // batch, c, like=grad).view(-1, c)  # read by the filters
    g.copy_(grad)
    r = (grad.new_empty(grad.shape), grad.new_empty(grad.shape))  # r_s, r_b (contiguous)
    grads_a = [a_s.new_zeros((c, c)) if need else None for need in (need_s, need_b)]  # pᵀ r, negated at the end
    if diagonal:  # ∂L/∂p = r_s ⊙ f_s + r_b ⊙ f_b
        factors, neg_a_t = -torch.stack([a_s.diagonal(), a_b.diagonal()]), None
    else:  # ∂L/∂p = −(r_s A_sᵀ + r_b A_bᵀ)
        factors, neg_a_t = None, (-a_s.t(), -a_b.t())
    for t in range(probs.shape[0] - 1, -1, -1):
        p = probs[t]
        # r = Kᵀ (n ⊙ G) for both kernels: the messages' gradients are −r
        filter_each(g.view(shape), lattices, normalize=True, transpose=True, out=[x.view(shape) for x in r])
        for ga, rk in zip(grads_a, r):
            if ga is not None:
                ga.addmm_(p.t(), rk)
        grad_p = None if neg_a_t is None else torch.mm(r[0], neg_a_t[0]).addmm_(r[1], neg_a_t[1])
        _softmax_backward_into(p, g, grad_u, grad_p=grad_p, r=r, factors=factors)  # G_{t-1}, and u's share
    grads_a = [None if ga is None else ga.neg_() for ga in grads_a]
    return grad_u, grads_a[0], grads_a[1]


def _mean_field_inference(
    u: torch.Tensor,
    spatial: PermutohedralLattice,
    bilateral: PermutohedralLattice,
    a_s: torch.Tensor,
    a_b: torch.Tensor,
    num_iterations: int,
    batch: int,
) -> torch.Tensor:
    """The iterations without autograd, in two buffers reused by every iteration.

    Same arithmetic as the differentiable loop. One pass per iteration slices both messages, mixes them into the
    scores and writes the scores' softmax over ``p`` (the splats have read ``p`` by then) for the next iteration;
    only the last iteration stores the scores. Reusing the buffers matters on CPU: fresh tensors of tens of megabytes
    come from the operating system page by page, and at 1000×750 that costs more than the filtering.
    """
    q = torch.empty_like(u)
    p = values_buffer(1, u.shape[0], u.shape[1], like=u)[0]  # rows padded where the filter reads them faster
    _softmax_into(u, p)
    for t in range(num_iterations):
        last = t == num_iterations - 1
        _filter_and_update(p, u, a_s, a_b, spatial, bilateral, batch, q=q, softmax_out=None if last else p)
    return q


def _filter_and_update(p, u, a_s, a_b, spatial, bilateral, batch, *, q, softmax_out=None):
    """One mean-field step after the softmax, without autograd: ``q = u − (n_s ⊙ K_s p) A_s − (n_b ⊙ K_b p) A_b``.

    ``A`` are (C, C) matrices or (C,) per-class scales; both messages are sliced and mixed in one pass where the back
    end can (see :func:`~crfasrnn.lattice.filter_sum`). ``q`` receives the result and is returned; where
    ``softmax_out`` (which may be ``p``) is given, it receives ``softmax(q)`` instead and ``q`` is not stored.
    """
    points = p.view(batch, -1, p.shape[1])
    soft = None if softmax_out is None else softmax_out.view(points.shape)
    filter_sum(points, (spatial, bilateral), (-a_s, -a_b), base=u.view(points.shape), out=q.view(points.shape),
               softmax_out=soft, keep_sum=soft is None)
    return q


def _softmax_into(logits: torch.Tensor, out: torch.Tensor) -> None:
    """``out = softmax(logits, dim=1)``, without allocating where ``out`` is contiguous (it may have padded rows)."""
    if not out.is_contiguous():  # the out= overload below would write it as if it were contiguous
        out.copy_(torch.softmax(logits, dim=1))  # faster than torch.softmax(..., out=out) into padded rows
        return
    try:
        torch.ops.aten._softmax.out(logits, 1, False, out=out)
    except (AttributeError, RuntimeError):  # pragma: no cover - an ATen without the out= overload
        out.copy_(F.softmax(logits, dim=1))


def _softmax_backward_into(p, g_out, grad_u, *, grad_p=None, r=None, factors=None) -> None:
    """``g_out = p ⊙ (d − Σ_c p ⊙ d)`` (the gradient through ``p = softmax(q, dim=1)``) and ``grad_u += g_out``.

    ``d`` is ``grad_p``, or ``r[0] ⊙ factors[0] + r[1] ⊙ factors[1]``; ``grad_u`` may be None. On the CPU with
    numba, one compiled pass; otherwise torch operations.
    """
    if _crf_numba is not None and p.device.type == "cpu":
        _crf_numba.softmax_backward(p, g_out, grad_u, grad_p=grad_p, r=r, factors=factors)
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
