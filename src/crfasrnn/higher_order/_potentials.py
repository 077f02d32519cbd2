"""The higher-order potentials and the mean field that runs with them (Arnab et al., ECCV 2016; caffe-tvg).

Scores follow the CRF-RNN convention (a score is a negative energy; ``q_t = u − pairwise(p_t) + ...``), in point layout
(B, N, C). With ``p_t = softmax(q_{t-1})`` and ``q_0 = u``, iteration t computes

    q_t = u − Σ_k (n_k ⊙ K_k p_t) A_k  +  x_t  +  s  +  r_t

where the first two terms are the plain layer's (:mod:`crfasrnn._mean_field`) and:

* **detections** (``x_t``). Detection d has a label l_d, a score s_d, foreground pixels F_d and a latent binary
  variable Y_d (the detection is right) with marginal ``y = (y⁰, y¹)``. Its energy charges ``w_x[l_d] s_d`` for every
  pixel of F_d not labelled l_d while Y_d = 1, and for every pixel labelled l_d while Y_d = 0; ``w_y`` weighs the same
  agreement in Y's update, per pixel of F_d (divided by |F_d|). Mean field updates both from the previous marginals:

      x_t[i, l]  = − Σ_{d: i ∈ F_d} w_x[l_d] s_d · (y⁰_d if l = l_d else y¹_d)
      y⁰ ← softmax( (1 − π_d) − w_y[l_d] (s_d / |F_d|) Σ_{i ∈ F_d} p_t[i, l_d],
      y¹          π_d       − w_y[l_d] (s_d / |F_d|) Σ_{i ∈ F_d} (1 − p_t[i, l_d]) )

  with ``π_d = min(s_d / max_score, 1 − ε)`` also Y's initial marginal ``(1 − π_d, π_d)``. This is caffe-tvg's
  ``MeanfieldIteration::compute_detection_potential_update`` term for term, including its use of the initial
  *probabilities* (not their logarithms) as Y's unary.
* **superpixels, caffe-tvg's released form** (``s``, ``superpixel_potential="mean"``, the default): per segmentation
  σ with weight w_σ, every pixel gets the mean of the unary over its segment, ``s[i] = Σ_σ w_σ · mean_{j ∈ σ(i)}
  u[j]``. It is computed once, from the unary, and added in every iteration (as caffe-tvg's ``au_blobs``).
* **superpixels, the paper's Pⁿ-Potts form** (``r_t``, ``superpixel_potential="potts"``): a segment c costs
  ``w_low(l)`` when all its pixels take label l and ``w_high`` otherwise; its mean-field message to pixel i is (up to a
  constant per pixel) ``r_t[i, l] = Σ_σ γ_σ[l] Π_{j ∈ σ(i), j ≠ i} p_t[j, l]`` with the reward ``γ = w_high − w_low``
  learned per scale and class, computed in the log domain. The paper's model has γ ≥ 0; the layer learns γ
  unconstrained, as CRF-RNN learns its compatibility matrix (a negative γ softens segments that agree).

Why the released form is the default: it is what caffe-tvg trained and published, its term is linear in the unary (its
gradients never vanish), and it smooths noise inside a segment from the first iteration; the product over a segment of
hundreds of pixels is ~0 unless the segment already agrees, so the Pⁿ-Potts message only reinforces consistent
segments, and its gradient vanishes with it.

Everything here is torch operations plus ``crfasrnn::lattice_filter`` (the pairwise term, on the lattices the plain
layer builds), so autograd gives every gradient and ``torch.compile`` traces it.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .._checks import check_count
from ..lattice import mode_scales
from ._inputs import Detections, Superpixels

__all__ = [
    "HigherOrderPotentials",
    "SuperpixelPotential",
    "detection_update",
    "detection_y_init",
    "mean_field_higher_order",
    "superpixel_mean_term",
    "superpixel_potts_term",
]

SuperpixelPotential = Literal["mean", "potts"]


class HigherOrderPotentials(nn.Module):
    """The learnable weights of the higher-order potentials of a :class:`~crfasrnn.crf.CrfRnn` layer.

    Args:
        num_classes: C.
        detections: enable the detection potential (parameters ``detection_x_weights`` and ``detection_y_weights``,
            (C,), caffe-tvg's blobs 3 and 4).
        superpixel_scales: the number S of superpixel segmentations the layer takes (0: none).
        superpixel_potential: ``"mean"`` (caffe-tvg's released form, parameter ``superpixel_weights`` (S,), its blob
            5) or ``"potts"`` (the paper's Pⁿ-Potts consistency, ``superpixel_weights`` (S, C), the rewards γ).
        detection_x_weight, detection_y_weight, superpixel_weight: initial values of the weights.
        max_score: a detection's score divided by this is Y's initial probability (caffe-tvg's
            ``detection_potentials_max_score``).
        epsilon: that probability is kept below 1 − ε (caffe-tvg's ``detection_potentials_epsilon``).

    Example:
        >>> ho = HigherOrderPotentials(3, detections=True, superpixel_scales=2)
        >>> sorted(name for name, _ in ho.named_parameters())
        ['detection_x_weights', 'detection_y_weights', 'superpixel_weights']
    """

    def __init__(
        self,
        num_classes: int,
        *,
        detections: bool = False,
        superpixel_scales: int = 0,
        superpixel_potential: SuperpixelPotential = "mean",
        detection_x_weight: float = 1.0,
        detection_y_weight: float = 1.0,
        superpixel_weight: float = 0.5,
        max_score: float = 1.0,
        epsilon: float = 1e-4,
    ) -> None:
        super().__init__()
        check_count("superpixel_scales", superpixel_scales)
        if superpixel_potential not in ("mean", "potts"):
            raise ValueError(f"superpixel_potential must be 'mean' or 'potts', got {superpixel_potential!r}")
        if not (max_score > 0 and 0 < epsilon < 1):
            raise ValueError(f"max_score must be > 0 and epsilon in (0, 1), got {max_score!r} and {epsilon!r}")
        self.num_classes = num_classes
        self.detections = bool(detections)
        self.superpixel_scales = superpixel_scales
        self.superpixel_potential: SuperpixelPotential = superpixel_potential
        self.max_score = float(max_score)
        self.epsilon = float(epsilon)
        if self.detections:
            self.detection_x_weights = nn.Parameter(torch.full((num_classes,), float(detection_x_weight)))
            self.detection_y_weights = nn.Parameter(torch.full((num_classes,), float(detection_y_weight)))
        if superpixel_scales:
            shape = (superpixel_scales,) if superpixel_potential == "mean" else (superpixel_scales, num_classes)
            self.superpixel_weights = nn.Parameter(torch.full(shape, float(superpixel_weight)))

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, detections={self.detections}, "
            f"superpixel_scales={self.superpixel_scales}, superpixel_potential={self.superpixel_potential!r}"
        )


def detection_y_init(scores: torch.Tensor, max_score: float, epsilon: float) -> torch.Tensor:
    """Y's initial marginals (B, D, 2) ``(1 − π, π)``, ``π = min(score / max_score, 1 − ε)`` (caffe-tvg's
    ``init_detection_y_unaries``)."""
    positive = (scores / max_score).clamp(max=1 - epsilon)
    return torch.stack((1 - positive, positive), dim=-1)


def detection_update(
    probs: torch.Tensor,
    y: torch.Tensor,
    y_unary: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    masks: torch.Tensor,
    x_weights: torch.Tensor,
    y_weights: torch.Tensor,
    sizes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One mean-field update of the detection potential (see the module docstring).

    Args:
        probs: (B, N, C) the iteration's pixel marginals p_t.
        y: (B, D, 2) the detections' marginals from the previous iteration.
        y_unary: (B, D, 2) Y's unary (its initial marginals).
        labels: (B, D) int64; scores: (B, D); masks: (B, N, D) 0/1 in probs' dtype (pixel-major, as the pixels'
            term multiplies them).
        x_weights, y_weights: (C,) the class weights w_x, w_y.
        sizes: (B, D) the masks' pixel counts |F_d| (the same in every iteration; computed where not given).

    Returns:
        The pixels' term x_t (B, N, C) and Y's new marginals (B, D, 2).
    """
    c = probs.shape[-1]
    if sizes is None:
        sizes = masks.sum(dim=1)
    # Σ_{i ∈ F_d} p_t[i, l] for every detection and label, one matrix product (B, D, C); then l = l_d
    agree = torch.bmm(masks.transpose(1, 2), probs).gather(2, labels[..., None]).squeeze(-1)
    y_mult = y_weights[labels] * scores / (sizes + 1e-6)  # caffe-tvg's get_y_potentials_multiplier, times w_y
    y_logits = y_unary - y_mult[..., None] * torch.stack((agree, sizes - agree), dim=-1)
    x_mult = x_weights[labels] * scores  # w_x[l_d] s_d
    onehot = torch.nn.functional.one_hot(labels, c).to(probs.dtype)  # (B, D, C)
    # each detection's charge on its pixels' labels: y¹ on every label, y⁰ instead on l_d
    charge = (x_mult * y[..., 1])[..., None] + (x_mult * (y[..., 0] - y[..., 1]))[..., None] * onehot
    x_term = -torch.bmm(masks, charge)
    return x_term, torch.softmax(y_logits, dim=-1)


def _segment_index(segments: torch.Tensor, num_segments: int) -> torch.Tensor:
    """(B, S, N) segment ids → (S, B·N) indices into a per-(scale, image, segment) table of B·K rows per scale."""
    b, s, n = segments.shape
    offsets = torch.arange(b, device=segments.device).view(b, 1, 1) * num_segments
    return (segments + offsets).permute(1, 0, 2).reshape(s, b * n)


def _segment_sums(values_t: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    """Σ over each segment of (C, B·N) values (class-major: ``index_add`` along the long axis is several times faster
    on the CPU than over rows of C values), for one scale's (B·N,) index: (C, rows)."""
    return values_t.new_zeros((values_t.shape[0], rows)).index_add(1, index, values_t)


def superpixel_mean_term(
    unary: torch.Tensor, segments: torch.Tensor, num_segments: int, weights: torch.Tensor
) -> torch.Tensor:
    """caffe-tvg's superpixel term ``s[i] = Σ_σ w_σ · mean_{j ∈ σ(i)} u[j]``: (B, N, C) unary, (B, S, N) segments,
    (S,) weights → (B, N, C)."""
    b, n, c = unary.shape
    index = _segment_index(segments, num_segments)
    flat_t = unary.reshape(b * n, c).t().contiguous()
    rows = b * num_segments
    term = None
    for scale in range(segments.shape[1]):
        counts = torch.bincount(index[scale], minlength=rows).clamp(min=1).to(unary.dtype)
        means = _segment_sums(flat_t, index[scale], rows) / counts
        part = weights[scale] * means.index_select(1, index[scale])
        term = part if term is None else term + part
    assert term is not None
    return term.t().reshape(b, n, c)


def superpixel_potts_term(
    log_probs: torch.Tensor, segments: torch.Tensor, num_segments: int, weights: torch.Tensor
) -> torch.Tensor:
    """The Pⁿ-Potts message ``r[i, l] = Σ_σ γ_σ[l] Π_{j ∈ σ(i), j ≠ i} p[j, l]``: (B, N, C) log-marginals, (B, S, N)
    segments, (S, C) rewards γ → (B, N, C)."""
    b, n, c = log_probs.shape
    index = _segment_index(segments, num_segments)
    flat_t = log_probs.reshape(b * n, c).t().contiguous()
    term = None
    for scale in range(segments.shape[1]):
        log_product = _segment_sums(flat_t, index[scale], b * num_segments).index_select(1, index[scale])
        part = weights[scale][:, None] * torch.exp(log_product - flat_t)  # leave pixel i out
        term = part if term is None else term + part
    assert term is not None
    return term.t().reshape(b, n, c)


def _pairwise(probs, lattices, mixing, modes) -> torch.Tensor:
    """``Σ_k (n_k ⊙ K_k p) A_k`` through ``crfasrnn::lattice_filter``."""
    total = None
    for lattice, a, mode in zip(lattices, mixing, modes):
        pre, post = mode_scales(int(mode))
        message = torch.ops.crfasrnn.lattice_filter(probs.contiguous(), list(lattice), False, pre, post) @ a
        total = message if total is None else total + message
    assert total is not None
    return total


def mean_field_higher_order(
    u: torch.Tensor,
    lattices,
    mixing,
    modes,
    num_iterations: int,
    potentials: HigherOrderPotentials,
    detections: Detections | None,
    superpixels: Superpixels | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean field with the higher-order potentials over (B, N, C) unary scores in point layout.

    ``lattices``, ``mixing`` and ``modes`` are the plain layer's (see :func:`crfasrnn.engine.mean_field_scores`);
    ``detections`` and ``superpixels`` are given at the image size (N = H·W pixels). Returns the scores q_T
    (B, N, C) and, with detections, their final marginals (B, D, 2) (caffe-tvg's ``top[1]``), else None.
    """
    b, n, _ = u.shape
    dtype = u.dtype
    det = None
    if detections is not None and potentials.detections and detections.labels.shape[1] > 0:
        masks = detections.masks.reshape(b, detections.masks.shape[1], n).transpose(1, 2).to(dtype).contiguous()
        scores = detections.scores.to(dtype)
        y_unary = detection_y_init(scores, potentials.max_score, potentials.epsilon)
        det = (detections.labels, scores, masks, y_unary, masks.sum(dim=1))
    superpixel_term = None
    segments = None
    if superpixels is not None and potentials.superpixel_scales:
        segments = superpixels.segments.reshape(b, superpixels.num_scales, n)
        weights = potentials.superpixel_weights.to(dtype)
        if potentials.superpixel_potential == "mean":
            superpixel_term = superpixel_mean_term(u, segments, superpixels.num_segments, weights)
    y = None if det is None else det[3]
    q = u
    for _ in range(num_iterations):
        probs = torch.softmax(q, dim=-1)
        q_next = u - _pairwise(probs, lattices, mixing, modes)
        if det is not None and y is not None:
            labels, scores, masks, y_unary, sizes = det
            x_term, y_next = detection_update(
                probs,
                y,
                y_unary,
                labels,
                scores,
                masks,
                potentials.detection_x_weights.to(dtype),
                potentials.detection_y_weights.to(dtype),
                sizes,
            )
            q_next = q_next + x_term
            y = y_next
        if superpixel_term is not None:
            q_next = q_next + superpixel_term
        elif segments is not None and superpixels is not None:  # the Pⁿ-Potts form
            q_next = q_next + superpixel_potts_term(
                torch.log_softmax(q, dim=-1),
                segments,
                superpixels.num_segments,
                potentials.superpixel_weights.to(dtype),
            )
        q = q_next
    return q, y
