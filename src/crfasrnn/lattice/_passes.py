"""A dense CRF's message passing over several lattices at once: :func:`filter_each` and :func:`filter_sum`.

Neither is differentiable: they are what the mean-field operators run inside, where a fused pass (on numba, two
lattices sliced together, with the next softmax) saves memory and time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _ops
from ._backend import check_buffer, numba_kernels
from ._lattice import PermutohedralLattice

__all__ = ["filter_each", "filter_sum"]


def filter_each(
    values: torch.Tensor,
    lattices: Sequence[PermutohedralLattice],
    *,
    normalize: bool = False,
    transpose: bool = False,
    out: Sequence[torch.Tensor | None] | None = None,
    modes: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """The same values filtered through each of several lattices (or through their transposes).

    Equivalent to ``[lattice.filter_points(values, normalize=normalize) for lattice in lattices]`` (with
    ``transpose``: :meth:`PermutohedralLattice.transpose_points`), but not differentiable, and on the numba back end
    the values are laid out for the filters once rather than once per lattice. What a CRF's message passing (and its
    backward) does with the same probabilities (gradients) and its two kernels.

    Args:
        values: (B, H·W, C) values in point layout (rows may be padded, see :func:`values_buffer`).
        lattices: lattices built over the same image size (each for batch B, or 1 to be shared by the batch).
        normalize: multiply by each lattice's normaliser (after the filter; before the transposed filter).
        transpose: apply the transposed filters.
        out: optional (B, H·W, C) tensors to write into, one per lattice (or None); their rows may be padded, so that
            they can be column slices of one tensor, e.g. the halves of a (B, H·W, 2C) tensor.
        modes: per lattice, a normalisation mode (``_ops.NO_NORMALIZATION`` … ``NORMALIZE_SYMMETRIC``) instead of
            ``normalize`` (which means ``NORMALIZE_AFTER`` for every lattice); with ``transpose``, its transpose.

    Returns:
        One (B, H·W, C) tensor per lattice (the ``out`` tensors when given).

    Example:
        >>> yy, xx = torch.meshgrid(torch.arange(6.0), torch.arange(8.0), indexing="ij")
        >>> a = PermutohedralLattice(torch.stack([xx, yy])[None] / 3.0)
        >>> b = PermutohedralLattice(torch.stack([xx, yy, xx * yy])[None] / 5.0)
        >>> v = torch.rand(1, 48, 2)
        >>> fa, fb = filter_each(v, [a, b], normalize=True)
        >>> torch.allclose(fb, b.filter_points(v, normalize=True))
        True
    """
    outs = list(out) if out is not None else [None] * len(lattices)
    if len(outs) != len(lattices) or not lattices:
        raise ValueError(
            f"filter_each needs at least one lattice and one out per lattice, got {len(lattices)} "
            f"lattices and {len(outs)} out tensors"
        )
    for lattice, buffer in zip(lattices, outs):
        lattice.check_points(values)
        if buffer is not None:
            check_buffer("out", buffer, values, padded_rows=True)
    b, n, c = values.shape
    codes = _ops.mode_codes("filter_each", len(lattices), modes, normalize, transpose)
    with torch.no_grad():
        if all(lattice.backend == "numba" and lattice.batch_size == b for lattice in lattices):
            pres = [_ops.scale_vector(lat.tensors, pre) for lat, (pre, _) in zip(lattices, codes)]
            posts = [_ops.scale_vector(lat.tensors, post) for lat, (_, post) in zip(lattices, codes)]
            flat_outs = [None if o is None else o.view(b * n, c) for o in outs]
            results = numba_kernels.filter_each(
                tuple(lattice._structure for lattice in lattices),
                values.reshape(b * n, c),
                transpose,
                tuple(pres),
                tuple(posts),
                tuple(flat_outs),
            )
            return [r.view(b, n, c) if o is None else o for r, o in zip(results, outs)]
        results = [
            _ops.filter_tensors(lat.tensors, values, transpose, pre, post) for lat, (pre, post) in zip(lattices, codes)
        ]
        return [r if o is None else o.copy_(r) for r, o in zip(results, outs)]


def filter_sum(
    values: torch.Tensor,
    lattices: Sequence[PermutohedralLattice],
    scales: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    normalize: bool = True,
    out: torch.Tensor | None = None,
    softmax_out: torch.Tensor | None = None,
    keep_sum: bool = True,
    modes: Sequence[int] | None = None,
) -> torch.Tensor:
    """A weighted sum of several lattices' filterings of the same values: ``base + Σ_k (K_k values) ∘ scales[k]``.

    What a dense CRF's message passing computes with its kernels (``K_k`` normalised by :attr:`~PermutohedralLattice.
    normalizer` when ``normalize``). Not differentiable: for inference, where it saves memory and time — on the numba
    back end, with per-channel factors, two lattices are sliced in one pass, without materialising either filtered
    tensor (channel-mixing matrices are applied with a matrix product after the filters).

    Args:
        values: (B, H·W, C) values in point layout (see :meth:`PermutohedralLattice.filter_points`).
        lattices: lattices built over the same image size (each for batch B, or 1 to be shared by the batch).
        scales: per lattice, (C,) per-channel factors (``∘`` multiplies channel by channel) or a (C, C) channel-mixing
            matrix (``∘`` is the product of each point's row of C values with it, as in ``x @ M``).
        base: optional (B, H·W, C) term added to the sum (zeros if None).
        normalize: multiply each filtering by its lattice's normaliser.
        out: optional contiguous (B, H·W, C) tensor to write into; it may be ``base`` itself.
        softmax_out: optional (B, H·W, C) tensor that receives the softmax of the result over its channels (a
            mean-field step's next probabilities); it may be ``values`` itself, and contiguous or made by
            :func:`values_buffer` (values are fastest made so, when they are filtered again and again). On the numba
            back end in float32 it is computed in the same pass, which spares a pass over memory and a hand-over to
            torch's thread pool.
        keep_sum: with ``softmax_out``, ``False`` means that only the softmax is wanted: the sum is not stored (``out``
            is ignored) and ``softmax_out`` is returned.
        modes: per lattice, a normalisation mode (see :func:`filter_each`) instead of ``normalize``.

    Returns:
        (B, H·W, C) sum (``out`` when given), or ``softmax_out`` where ``keep_sum`` is False.

    Example:
        >>> yy, xx = torch.meshgrid(torch.arange(6.0), torch.arange(8.0), indexing="ij")
        >>> a = PermutohedralLattice(torch.stack([xx, yy])[None] / 3.0)
        >>> b = PermutohedralLattice(torch.stack([xx, yy, xx * yy])[None] / 5.0)
        >>> v = torch.rand(1, 48, 2)
        >>> total = filter_sum(v, [a, b], [torch.ones(2), -torch.ones(2)])
        >>> torch.allclose(total, a.filter_points(v, normalize=True) - b.filter_points(v, normalize=True), atol=1e-6)
        True
    """
    if len(lattices) != len(scales) or not lattices:
        raise ValueError(
            f"filter_sum needs one scale per lattice and at least one lattice, got {len(lattices)} "
            f"lattices and {len(scales)} scales"
        )
    for lattice in lattices:
        lattice.check_points(values)
    b, n, c = values.shape
    for scale in scales:
        if scale.shape not in ((c,), (c, c)):
            raise ValueError(
                f"each scale must have shape ({c},) or ({c}, {c}) for values {tuple(values.shape)}, got "
                f"{tuple(scale.shape)}"
            )
    if base is not None and base.shape != values.shape:
        raise ValueError(f"base {tuple(base.shape)} must have the shape of values {tuple(values.shape)}")
    if out is None:
        out = torch.empty_like(values)
    else:
        check_buffer("out", out, values)
    if softmax_out is not None:
        check_buffer("softmax_out", softmax_out, values, padded_rows=True)
    if not keep_sum and softmax_out is None:
        raise ValueError("keep_sum=False needs softmax_out: otherwise nothing would be computed")
    codes = _ops.mode_codes("filter_sum", len(lattices), modes, normalize)
    with torch.no_grad():
        if base is None:
            base = torch.zeros_like(values)
        fused = (
            len(lattices) == 2
            and all(lattice.backend == "numba" for lattice in lattices)
            and all(scale.ndim == 1 for scale in scales)
            and base.is_contiguous()
        )
        if fused:
            posts = [_ops.scale_vector(lat.tensors, post) for lat, (_, post) in zip(lattices, codes)]
            posts = [values.new_ones(lat.batch_size * n) if p is None else p for lat, p in zip(lattices, posts)]
            pres = [_ops.scale_vector(lat.tensors, pre) for lat, (pre, _) in zip(lattices, codes)]
            fused_softmax = softmax_out is not None and values.dtype == torch.float32
            store_sum = keep_sum or not fused_softmax  # only the softmax wanted and fused: the sum is never stored
            numba_kernels.filter_sum(
                tuple(lattices[k]._structure for k in range(2)),
                values,
                (scales[0].to(values.dtype).contiguous(), scales[1].to(values.dtype).contiguous()),
                (posts[0], posts[1]),
                base.reshape(b * n, c),
                out.view(b * n, c) if store_sum else None,
                softmax_out if fused_softmax else None,
                pre_scales=tuple(pres),
            )
        else:
            fused_softmax = False
            terms = filter_each(values, lattices, normalize=normalize, modes=modes)  # on numba, laid out once
            flat = out.view(b * n, c)
            for k, (term, scale) in enumerate(zip(terms, scales)):
                start = base if k == 0 else out  # the first term also brings in the base (no separate copy)
                if scale.ndim == 2:
                    torch.addmm(start.reshape(b * n, c), term.reshape(b * n, c), scale.to(values.dtype), out=flat)
                else:
                    torch.addcmul(start, term, scale.to(values.dtype), out=out)
        if softmax_out is not None and not fused_softmax:
            torch.softmax(out, dim=-1, out=softmax_out)
        if keep_sum or softmax_out is None:  # (keep_sum=False without softmax_out was refused above)
            return out
        return softmax_out
