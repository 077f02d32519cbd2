"""The permutohedral lattice as a Python object: built once from features, reused for any number of filterings."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import InputTypeError
from . import _ops
from ._backend import Backend, check_buffer, resolve_backend

__all__ = ["PermutohedralLattice", "permutohedral_filter"]

_HALF = (torch.float16, torch.bfloat16)


class PermutohedralLattice:
    """A permutohedral lattice built once from per-pixel features and reused for any number of filterings.

    Each image of the batch gets its own lattice (the images never share a vertex). A lattice built from a batch of
    one image can filter a batch of any size with that same lattice (useful for the spatial kernel, which depends only
    on the image size).

    Args:
        features: (B, d, *spatial) floating tensor of per-point feature vectors (a signal, an image (B, d, H, W) or a
            volume (B, d, D, H, W)), already divided by the bandwidths (the
            lattice approximates a Gaussian of standard deviation 1 in feature space). Not differentiated.
            float16 and bfloat16 features are converted to float32 (the lattice's arithmetic needs its precision);
            half values given to :meth:`filter` and :meth:`filter_points` are then filtered in float32 and returned
            in their dtype.
        backend: ``"auto"`` (numba on CPU where installed, torch otherwise), ``"torch"`` or ``"numba"`` (CPU only).
        pad_to: build the lattice as the SSE reference implementations (pydensecrf, Caffe) do, whose elevation pads
            each image's points with zero feature vectors to a multiple of 4 and adds those vectors' vertices to the
            lattice (docs/reference.md §3.4): ``pad_to=4`` reproduces their numbers where N is not a multiple of 4 (the
            difference is of the order of 1e-4, near the zero vector). 1 (the default): no phantom vertices.
        compact: on the numba back end, keep no vertex-major splat lists (two arrays of one entry per point and
            vertex): the splat then scatters ranges of points into grids of their own, summed in order. About half
            the memory, and faster where the lattice has few vertices and the values few channels (volumes); the
            sums' order differs, so results differ from the default's in the last bits. The torch back end has no
            lists either way.

    Shape:
        - features: (B, d, *spatial), 1 to 3 spatial dimensions (e.g. (B, d, H, W))
        - values given to :meth:`filter`: (B, C, *spatial) or, with a lattice of batch 1, (B', C, *spatial)
        - values given to :meth:`filter_points`: (B, N, C) (channels last; N the number of points, e.g. H·W)
        - output: same as the values

    Example:
        >>> feats = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(5.0), indexing="ij"))[None] / 2
        >>> lattice = PermutohedralLattice(feats)
        >>> lattice.filter(torch.ones(1, 3, 4, 5)).shape
        torch.Size([1, 3, 4, 5])
    """

    def __init__(
        self, features: torch.Tensor, *, backend: Backend = "auto", pad_to: int = 1, compact: bool = False
    ) -> None:
        if not isinstance(features, torch.Tensor):
            raise InputTypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
        if not 3 <= features.ndim <= 5:
            raise ValueError(
                f"features must have shape (B, d, *spatial) with 1 to 3 spatial dimensions, e.g. "
                f"(B, d, H, W), got {tuple(features.shape)}"
            )
        if not features.is_floating_point():
            raise InputTypeError(f"features must be a floating tensor, got dtype {features.dtype}")
        if min(features.shape) < 1:
            raise ValueError(f"features must have B, d and every size >= 1, got shape {tuple(features.shape)}")
        resolved = resolve_backend(backend, features.device)
        if features.dtype in _HALF:
            features = features.float()
        batch, d = features.shape[:2]
        size = tuple(int(s) for s in features.shape[2:])
        num_points = math.prod(size)
        points = features.detach().reshape(batch, d, num_points).transpose(1, 2).contiguous()
        self._init(_ops.build(points, resolved, pad_to, compact), num_points)
        self.size: tuple[int, ...] = size

    def _init(self, tensors: list[torch.Tensor], num_points: int) -> None:
        self._tensors = tensors
        self.backend: str = "numba" if _ops.is_numba(tensors) else "torch"
        self.num_points = num_points
        self.batch_size = tensors[0].shape[0] // num_points
        self.dim = tensors[0].shape[1] - 1
        self.size = (num_points,)
        self.dtype = tensors[1].dtype
        self.device = tensors[1].device
        self._built_structure = None

    @classmethod
    def from_tensors(cls, tensors: Sequence[torch.Tensor], num_points: int) -> PermutohedralLattice:
        """A lattice over the tensors of a built one (:attr:`tensors`), e.g. inside an operator; ``size`` is (N,)."""
        lattice = cls.__new__(cls)
        lattice._init(list(tensors), num_points)
        return lattice

    @property
    def tensors(self) -> list[torch.Tensor]:
        """The built lattice as a list of tensors (see :data:`crfasrnn.lattice._ops.FIELDS`), as operators take it."""
        return self._tensors

    @property
    def _structure(self):
        if self._built_structure is None:
            self._built_structure = _ops.structure(self._tensors)
        return self._built_structure

    @property
    def num_vertices(self) -> int:
        """Number of lattice vertices (over the whole batch)."""
        return self._tensors[2].shape[2] - 1

    @property
    def normalizer(self) -> torch.Tensor:
        """(B, H·W, 1) per-pixel normaliser ``1 / (K·1 + ε)``, computed with the lattice (ε = 2.22e-16)."""
        return self._tensors[3].view(self.batch_size, -1, 1)

    def filter(self, values: torch.Tensor, reverse: bool = False, normalize: bool = False) -> torch.Tensor:
        """Filter values through the lattice, differentiably with respect to ``values``.

        Args:
            values: (B, C, *spatial) tensor with the lattice's dtype, device and size; B must equal the lattice's batch
                size, or the lattice must have batch size 1 (then it filters every image of ``values``).
            reverse: blur the lattice axes in reverse order, which applies the transpose of the forward filter.
            normalize: divide the result per pixel by the filtered all-ones image (see :attr:`normalizer`), so that
                the weights at each pixel sum to about one: ``n ⊙ K v``.

        Returns:
            (B, C, *spatial) filtered values.
        """
        if not isinstance(values, torch.Tensor):
            raise InputTypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
        if values.ndim != 2 + len(self.size) or tuple(values.shape[2:]) != self.size:
            raise ValueError(
                f"values must have shape (B, C, {', '.join(map(str, self.size))}) for this lattice, "
                f"got {tuple(values.shape)}"
            )
        b, c = values.shape[:2]
        points = values.reshape(b, c, self.num_points).transpose(1, 2)
        return self.filter_points(points, reverse, normalize).transpose(1, 2).reshape(values.shape)

    def filter_points(
        self,
        values: torch.Tensor,
        reverse: bool = False,
        normalize: bool = False,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Like :meth:`filter`, for values in point layout (channels last), which avoids two transpositions.

        Args:
            values: (B, H·W, C) values; pixel ``y·W + x`` of image b is row ``values[b, y·W + x]``.
            reverse: blur the lattice axes in reverse order (the transpose).
            normalize: multiply the result by :attr:`normalizer`.
            out: optional contiguous tensor shaped like ``values`` to write the result into (not differentiable:
                only where no gradient is needed, to reuse memory across calls).

        Returns:
            (B, H·W, C) filtered values (``out`` when given).
        """
        return self._filter_checked("filter_points", values, reverse, False, normalize, out)

    def transpose_points(
        self,
        values: torch.Tensor,
        normalize: bool = False,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The transpose of :meth:`filter_points`: ``Kᵀ values``, or ``Kᵀ (n ⊙ values)`` where ``normalize``.

        What the backward of a filtering needs: for ``y = n ⊙ K v``, ``∂L/∂v = Kᵀ (n ⊙ ∂L/∂y)``. The normaliser
        scales the values as they are splatted, which spares a product over the whole tensor.

        Args:
            values: (B, H·W, C) values in point layout (rows may be padded, see :func:`values_buffer`).
            normalize: scale the values by :attr:`normalizer` before the transposed filter.
            out: optional contiguous tensor shaped like ``values`` to write into (not differentiable).

        Returns:
            (B, H·W, C) result (``out`` when given), differentiable with respect to ``values`` when ``out`` is None.

        Example:
            >>> feats = torch.rand(1, 3, 4, 5) * 4
            >>> lattice = PermutohedralLattice(feats)
            >>> v, g = torch.rand(1, 20, 2), torch.rand(1, 20, 2)
            >>> lhs = (lattice.filter_points(v, normalize=True) * g).sum()
            >>> rhs = (v * lattice.transpose_points(g, normalize=True)).sum()
            >>> bool(torch.isclose(lhs, rhs, rtol=1e-5))
            True
        """
        return self._filter_checked("transpose_points", values, True, normalize, False, out)

    def _filter_checked(
        self,
        name: str,
        values: torch.Tensor,
        reverse: bool,
        pre: bool,
        post: bool,
        out: torch.Tensor | None,
    ) -> torch.Tensor:
        """``n^post ⊙ K (n^pre ⊙ values)`` for the public method ``name``: differentiable (the
        ``crfasrnn::lattice_filter`` operator), or into ``out`` without autograd."""
        if out is None and values.dtype in _HALF and self.dtype == torch.float32:  # computed in float32
            return self._filter_checked(name, values.float(), reverse, pre, post, None).to(values.dtype)
        self.check_points(values)
        if out is None:
            return torch.ops.crfasrnn.lattice_filter(values, self._tensors, reverse, int(pre), int(post))
        check_buffer("out", out, values)
        if torch.is_grad_enabled() and (values.requires_grad or out.requires_grad):
            raise RuntimeError(f"{name}(out=...) does not support autograd; call it without out= to differentiate")
        with torch.no_grad():
            _ops.filter_tensors(self._tensors, values, reverse, int(pre), int(post), out=out)
        return out

    def check_points(self, values: torch.Tensor) -> None:
        """Refuse (B, N, C) values this lattice cannot filter (dtype, device, shape), naming what was given."""
        if not isinstance(values, torch.Tensor):
            raise InputTypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
        if values.dtype != self.dtype:
            raise InputTypeError(f"values have dtype {values.dtype} but the lattice features have dtype {self.dtype}")
        if values.device != self.device:
            raise ValueError(f"values are on {values.device} but the lattice is on {self.device}")
        num_points = self.num_points
        if (
            values.ndim != 3
            or values.shape[1] != num_points
            or values.shape[2] < 1
            or (values.shape[0] != self.batch_size and self.batch_size != 1)
            or values.shape[0] < 1
        ):
            raise ValueError(
                f"values of shape {tuple(values.shape)} do not fit a lattice built for batch {self.batch_size} and "
                f"size {self.size} (expected ({self.batch_size}, {num_points}, C))"
            )


def permutohedral_filter(
    values: torch.Tensor, features: torch.Tensor, *, reverse: bool = False, backend: Backend = "auto"
) -> torch.Tensor:
    """Filter ``values`` with the unnormalised permutohedral-lattice Gaussian over ``features``.

    Builds a :class:`PermutohedralLattice` and filters once. To filter several times with the same features, build the
    lattice once and call :meth:`PermutohedralLattice.filter`.

    Args:
        values: (B, C, H, W) values to filter.
        features: (B, d, H, W) per-pixel features, already divided by the bandwidths; same dtype and device.
        reverse: blur in reverse axis order, which is exactly the transpose of the forward filter.
        backend: see :class:`PermutohedralLattice`.

    Returns:
        (B, C, H, W) filtered values, differentiable with respect to ``values``.

    Shape:
        - values: (B, C, H, W)
        - features: (B, d, H, W)
        - output: (B, C, H, W)

    Example:
        >>> yy, xx = torch.meshgrid(torch.arange(6.0), torch.arange(8.0), indexing="ij")
        >>> feats = torch.stack([xx, yy])[None] / 3.0
        >>> out = permutohedral_filter(torch.ones(1, 1, 6, 8), feats)
        >>> out.shape
        torch.Size([1, 1, 6, 8])
    """
    if not isinstance(values, torch.Tensor) or not isinstance(features, torch.Tensor):
        raise InputTypeError("values and features must be torch tensors")
    if values.ndim != 4 or features.ndim != 4:
        raise ValueError(
            f"values must be (B, C, H, W) and features (B, d, H, W), got {tuple(values.shape)} and "
            f"{tuple(features.shape)}"
        )
    if values.shape[0] != features.shape[0] or values.shape[2:] != features.shape[2:]:
        raise ValueError(
            f"values {tuple(values.shape)} and features {tuple(features.shape)} differ in batch size or H, W"
        )
    if values.dtype != features.dtype:
        raise InputTypeError(f"values have dtype {values.dtype} but features have dtype {features.dtype}")
    return PermutohedralLattice(features, backend=backend).filter(values, reverse=reverse)
