"""The CRF-RNN layer: mean-field inference of a fully connected CRF as a recurrent, differentiable layer.

Zheng, Jayasumana, Romera-Paredes, Vineet, Su, Du, Huang and Torr, *Conditional Random Fields as Recurrent Neural
Networks*, ICCV 2015. The pairwise potentials are the two Gaussian kernels of Krähenbühl and Koltun's dense CRF (NIPS
2011), a spatial (smoothness) kernel over pixel positions and a bilateral (appearance) kernel over positions and colours,
filtered with the permutohedral lattice (:mod:`crfasrnn.lattice`).

Conventions (the Caffe original's and the paper's): the unary input is a score (a logit, the *negative* unary energy);
each iteration computes ``Q = U - M @ (W_s @ S + W_b @ B)`` with the compatibility matrix ``M`` initialised to ``-I``
(Potts). The PyTorch port stores ``-M``; :mod:`crfasrnn.weights` converts its files.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .lattice import PermutohedralLattice, all_finite, filter_each, filter_sum, values_buffer

try:  # numba is optional: torch operations are used without it
    from . import _crf_numba
except ImportError:  # pragma: no cover - exercised only where numba is absent
    _crf_numba = None

__all__ = ["CrfRnn", "crf_rnn", "spatial_features", "bilateral_features"]



def _pixel_grid(height: int, width: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ys = torch.arange(height, dtype=like.dtype, device=like.device).view(height, 1).expand(height, width)
    xs = torch.arange(width, dtype=like.dtype, device=like.device).view(1, width).expand(height, width)
    return xs, ys


def spatial_features(height: int, width: int, theta_gamma: float, *, like: torch.Tensor) -> torch.Tensor:
    """Features of the spatial kernel: ``(x / θγ, y / θγ)`` with x the column and y the row, 0-based (SPEC §2.1).

    Args:
        height, width: image size in pixels.
        theta_gamma: spatial bandwidth θγ in pixels.
        like: a tensor whose dtype and device the features take.

    Returns:
        (1, 2, H, W) features (the same for every image of a batch).
    """
    xs, ys = _pixel_grid(height, width, like)
    return torch.stack([xs / theta_gamma, ys / theta_gamma])[None]


def bilateral_features(image: torch.Tensor, theta_alpha: float, theta_beta: float) -> torch.Tensor:
    """Features of the bilateral kernel: ``(x/θα, y/θα, I0/θβ, I1/θβ, I2/θβ)`` (SPEC §2.1).

    Args:
        image: (B, 3, H, W) colour channels in the units θβ refers to, used in tensor order.
        theta_alpha: positional bandwidth θα in pixels.
        theta_beta: colour bandwidth θβ in the image's units.

    Returns:
        (B, 5, H, W) features.
    """
    b, _, h, w = image.shape
    xs, ys = _pixel_grid(h, w, image)
    xy = torch.stack([xs / theta_alpha, ys / theta_alpha])[None].expand(b, 2, h, w)
    return torch.cat([xy, image / theta_beta], dim=1)


def _check_iterations(num_iterations: int) -> None:
    if isinstance(num_iterations, bool) or not isinstance(num_iterations, int) or num_iterations < 0:
        raise ValueError(f"num_iterations must be an integer >= 0, got {num_iterations!r}")


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def _check_inputs(
    unary: torch.Tensor, image: torch.Tensor, num_classes: int | None, parameter_device: torch.device | None = None
) -> None:
    for name, t in (("unary", unary), ("image", image)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, C, H, W), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype} (shape {tuple(t.shape)})")
    if image.shape[1] != 3:
        raise ValueError(f"image must have 3 channels (B, 3, H, W), got shape {tuple(image.shape)}")
    if unary.shape[0] != image.shape[0] or unary.shape[2:] != image.shape[2:]:
        raise ValueError(
            f"unary {tuple(unary.shape)} and image {tuple(image.shape)} must have the same batch size and H, W"
        )
    if num_classes is not None and unary.shape[1] != num_classes:
        raise ValueError(f"unary has {unary.shape[1]} classes but the layer has {num_classes} (shape {tuple(unary.shape)})")
    if unary.shape[0] < 1 or unary.shape[1] < 1 or unary.shape[2] < 1 or unary.shape[3] < 1:
        raise ValueError(f"unary must not be empty, got shape {tuple(unary.shape)}")
    if unary.device != image.device:
        raise ValueError(f"unary is on {unary.device} but image is on {image.device}")
    if parameter_device is not None and unary.device != parameter_device:
        raise ValueError(f"unary is on {unary.device} but the layer's parameters are on {parameter_device}")
    if not all_finite(unary):
        raise ValueError(f"unary {tuple(unary.shape)} contains NaN or Inf")
    if not all_finite(image):
        raise ValueError(f"image {tuple(image.shape)} contains NaN or Inf")


def crf_rnn(
    unary: torch.Tensor,
    image: torch.Tensor,
    spatial_weights: torch.Tensor,
    bilateral_weights: torch.Tensor,
    compatibility: torch.Tensor,
    *,
    num_iterations: int = 5,
    theta_alpha: float = 160.0,
    theta_beta: float = 3.0,
    theta_gamma: float = 3.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean-field inference of the dense CRF, unrolled for ``num_iterations`` steps (functional form of :class:`CrfRnn`).

    Per iteration: ``P = softmax(Q)``, ``S = n_s ⊙ K_s P``, ``B = n_b ⊙ K_b P`` with ``n = 1 / (K·1 + ε)``, and
    ``Q = U − M @ (W_s @ S + W_b @ B)``, starting from ``Q = U``. The lattices are built once per call (one per image
    for the bilateral kernel, one shared spatial lattice) and reused in every iteration and in backward.

    Args:
        unary: (B, C, H, W) unary scores (logits; higher means more likely).
        image: (B, 3, H, W) the colours of the bilateral kernel, in the units of ``theta_beta`` (0..255 for photos).
        spatial_weights: (C, C) spatial kernel weights W_s.
        bilateral_weights: (C, C) bilateral kernel weights W_b.
        compatibility: (C, C) label compatibility M (``-I`` is the Potts model).
        num_iterations: mean-field iterations T >= 0; 0 returns ``unary``.
        theta_alpha: positional bandwidth of the bilateral kernel, in pixels.
        theta_beta: colour bandwidth of the bilateral kernel, in image units.
        theta_gamma: bandwidth of the spatial kernel, in pixels.
        backend: lattice back end (``"auto"``, ``"torch"`` or ``"numba"``).

    Returns:
        (B, C, H, W) unnormalised scores Q^T (apply a softmax for marginals).
    """
    _check_inputs(unary, image, None)
    num_classes = unary.shape[1]
    for name, m in (("spatial_weights", spatial_weights), ("bilateral_weights", bilateral_weights),
                    ("compatibility", compatibility)):
        if m.shape != (num_classes, num_classes):
            raise ValueError(f"{name} must be ({num_classes}, {num_classes}) for {num_classes} classes, got {tuple(m.shape)}")
    _check_iterations(num_iterations)
    theta_alpha = _check_positive("theta_alpha", theta_alpha)
    theta_beta = _check_positive("theta_beta", theta_beta)
    theta_gamma = _check_positive("theta_gamma", theta_gamma)
    if num_iterations == 0:
        return unary

    b, c, h, w = unary.shape
    dtype = unary.dtype
    image = image.detach().to(dtype)
    with torch.no_grad():
        spatial = _spatial_lattice(h, w, theta_gamma, image.device, dtype, backend)
        bilateral = PermutohedralLattice(bilateral_features(image, theta_alpha, theta_beta), backend=backend)

    # Point layout (B·N, C): the lattices' native layout. With row vectors, Q = U − M (W_s S + W_b B) becomes
    # q = u − s (M W_s)ᵀ − b (M W_b)ᵀ: two (C×C) products formed once instead of three large products per iteration.
    matrices = (spatial_weights.to(dtype), bilateral_weights.to(dtype), compatibility.to(dtype))
    a_s = (matrices[2] @ matrices[0]).t()
    a_b = (matrices[2] @ matrices[1]).t()
    grad_mode = torch.is_grad_enabled()
    needs_matrix_grads = grad_mode and any(x.requires_grad for x in matrices)
    diagonal = _is_diagonal(a_s) and _is_diagonal(a_b)  # Potts-like models: per-class scales, not matrix products
    if not needs_matrix_grads and diagonal:
        a_s, a_b = a_s.diagonal(), a_b.diagonal()
    u = unary.permute(0, 2, 3, 1).reshape(b * h * w, c).contiguous()
    if not (needs_matrix_grads or (grad_mode and unary.requires_grad)):
        q = _mean_field_inference(u, spatial, bilateral, a_s.detach(), a_b.detach(), num_iterations, b)
    else:
        q = _MeanField.apply(u, a_s, a_b, spatial, bilateral, b, num_iterations, diagonal)
    return q.reshape(b, h, w, c).permute(0, 3, 1, 2)


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


class _MeanField(torch.autograd.Function):
    """All the iterations as one autograd node: ``p_t = softmax(q_{t-1})``, ``q_t = u − (n_s ⊙ K_s p_t) A_s −
    (n_b ⊙ K_b p_t) A_b`` from ``q_0 = u``, for (B·N, C) scores, saving only the probabilities.

    One node rather than one per iteration: forward and backward each reuse a few buffers across the iterations, and
    the unary's gradient (one term per iteration) is summed in place. Backward needs no filtered message: with
    ``r = Kᵀ (n ⊙ G)`` (one transposed filtering per kernel), ``∂L/∂p = −(r_s A_sᵀ + r_b A_bᵀ)`` and
    ``∂L/∂A = −pᵀ r`` (channel mixing commutes with the per-channel filter), ``∂L/∂u = Σ_t G_t`` and, through the
    softmax, ``G_{t-1} = p ⊙ (∂L/∂p − Σ_c p ⊙ ∂L/∂p)``. ``A`` may be (C, C) matrices or (C,) per-class scales.
    """

    @staticmethod
    def forward(ctx, u, a_s, a_b, spatial, bilateral, batch, num_iterations, diagonal):
        # Every iteration's probabilities (what backward needs) in one block allocated up front: one large mapping
        # that goes back to the system when freed, instead of a heap fragmented by tensor-sized blocks.
        probs = torch.empty((num_iterations, *u.shape), dtype=u.dtype, device=u.device)
        q = torch.empty_like(u)
        # Diagonal matrices (whose gradients may still be full) are applied as per-class scales: one fused pass
        f_s, f_b = (a_s.diagonal(), a_b.diagonal()) if diagonal and a_s.ndim == 2 else (a_s, a_b)
        _softmax_into(u, probs[0])
        for t in range(num_iterations):  # each pass also writes the next iteration's probabilities
            last = t == num_iterations - 1
            _filter_and_update(probs[t], u, f_s, f_b, spatial, bilateral, batch, q=q,
                               softmax_out=None if last else probs[t + 1])
        ctx.save_for_backward(a_s, a_b, probs)
        ctx.lattices, ctx.batch, ctx.diagonal = (spatial, bilateral), batch, diagonal
        return q

    @staticmethod
    @once_differentiable  # second derivatives would need p's dependence on q, which is not recorded
    def backward(ctx, grad):
        a_s, a_b, probs = ctx.saved_tensors
        need_u, need_s, need_b = ctx.needs_input_grad[:3]  # (C,) scales never need one: see crf_rnn
        c = grad.shape[1]
        shape = (ctx.batch, -1, c)
        grad_u = grad.contiguous().clone() if need_u else None
        g = values_buffer(ctx.batch, grad.shape[0] // ctx.batch, c, like=grad).view(-1, c)  # read by the filters
        g.copy_(grad)
        r = (grad.new_empty(grad.shape), grad.new_empty(grad.shape))  # r_s, r_b (contiguous)
        grads_a = [a_s.new_zeros((c, c)) if need else None for need in (need_s, need_b)]  # pᵀ r, negated at the end
        if a_s.ndim == 1 or ctx.diagonal:  # ∂L/∂p = r_s ⊙ f_s + r_b ⊙ f_b
            factors, neg_a_t = -torch.stack([_diagonal(a_s), _diagonal(a_b)]), None
        else:  # ∂L/∂p = −(r_s A_sᵀ + r_b A_bᵀ)
            factors, neg_a_t = None, (-a_s.t(), -a_b.t())
        for t in range(probs.shape[0] - 1, -1, -1):
            p = probs[t]
            # r = Kᵀ (n ⊙ G) for both kernels: the messages' gradients are −r
            filter_each(g.view(shape), ctx.lattices, normalize=True, transpose=True, out=[x.view(shape) for x in r])
            for ga, rk in zip(grads_a, r):
                if ga is not None:
                    ga.addmm_(p.t(), rk)
            grad_p = None if neg_a_t is None else torch.mm(r[0], neg_a_t[0]).addmm_(r[1], neg_a_t[1])
            _softmax_backward_into(p, g, grad_u, grad_p=grad_p, r=r, factors=factors)  # G_{t-1}, and u's share
        grads_a = [None if ga is None else ga.neg_() for ga in grads_a]
        return grad_u, grads_a[0], grads_a[1], None, None, None, None, None


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


def _diagonal(a: torch.Tensor) -> torch.Tensor:
    return a if a.ndim == 1 else a.diagonal()


def _is_diagonal(matrix: torch.Tensor) -> bool:
    return bool(torch.count_nonzero(matrix - torch.diag_embed(matrix.diagonal())) == 0)


@functools.lru_cache(maxsize=2)
def _spatial_lattice(
    height: int, width: int, theta_gamma: float, device: torch.device, dtype: torch.dtype, backend: str
) -> PermutohedralLattice:
    """The spatial lattice depends only on the image size: built once per size and kept (as Caffe does at set-up)."""
    like = torch.empty(0, dtype=dtype, device=device)
    return PermutohedralLattice(spatial_features(height, width, theta_gamma, like=like), backend=backend)


class CrfRnn(nn.Module):
    """CRF-RNN: mean-field inference of a fully connected CRF as a recurrent layer (Zheng et al., ICCV 2015).

    Args:
        num_classes: number of labels C.
        num_iterations: mean-field iterations (5 in training and 10 at test in the paper; 0 returns the unary).
        theta_alpha: positional bandwidth θα of the bilateral (appearance) kernel, in pixels.
        theta_beta: colour bandwidth θβ of the bilateral kernel, in the units of ``image`` (0..255 for photos).
        theta_gamma: bandwidth θγ of the spatial (smoothness) kernel, in pixels.
        spatial_weight: initial diagonal of the spatial kernel weights W_s.
        bilateral_weight: initial diagonal of the bilateral kernel weights W_b.
        backend: lattice back end: ``"auto"`` (numba on CPU where installed, torch otherwise), ``"torch"``, ``"numba"``.

    Parameters (learnable, float32, (C, C)): ``spatial_weights`` (init ``spatial_weight·I``), ``bilateral_weights``
    (init ``bilateral_weight·I``) and ``compatibility`` (init ``−I``, the Potts model in the Caffe/paper sign
    convention ``Q = U − M @ msg``). The bandwidths are fixed.

    Shape:
        - unary: (B, C, H, W) scores (logits).
        - image: (B, 3, H, W) floating colours giving the bilateral features, in the units θβ refers to.
        - output: (B, C, H, W) unnormalised scores (no softmax).

    Example:
        >>> crf = CrfRnn(num_classes=3, num_iterations=5)
        >>> unary = torch.randn(2, 3, 20, 30)
        >>> image = torch.rand(2, 3, 20, 30) * 255
        >>> crf(unary, image).shape
        torch.Size([2, 3, 20, 30])
    """

    def __init__(
        self,
        num_classes: int,
        num_iterations: int = 5,
        *,
        theta_alpha: float = 160.0,
        theta_beta: float = 3.0,
        theta_gamma: float = 3.0,
        spatial_weight: float = 3.0,
        bilateral_weight: float = 5.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        _check_iterations(num_iterations)
        if backend not in ("auto", "torch", "numba"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'numba', got {backend!r}")
        self.num_classes = num_classes
        self.num_iterations = num_iterations
        self.theta_alpha = _check_positive("theta_alpha", theta_alpha)
        self.theta_beta = _check_positive("theta_beta", theta_beta)
        self.theta_gamma = _check_positive("theta_gamma", theta_gamma)
        self.backend = backend
        eye = torch.eye(num_classes, dtype=torch.float32)
        self.spatial_weights = nn.Parameter(float(spatial_weight) * eye)
        self.bilateral_weights = nn.Parameter(float(bilateral_weight) * eye)
        self.compatibility = nn.Parameter(-eye.clone())

    def forward(self, unary: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Run ``num_iterations`` mean-field steps; see :func:`crf_rnn`."""
        _check_inputs(unary, image, self.num_classes, self.compatibility.device)
        return crf_rnn(
            unary,
            image,
            self.spatial_weights,
            self.bilateral_weights,
            self.compatibility,
            num_iterations=self.num_iterations,
            theta_alpha=self.theta_alpha,
            theta_beta=self.theta_beta,
            theta_gamma=self.theta_gamma,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, num_iterations={self.num_iterations}, theta_alpha={self.theta_alpha}, "
            f"theta_beta={self.theta_beta}, theta_gamma={self.theta_gamma}"
        )
