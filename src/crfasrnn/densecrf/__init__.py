"""pydensecrf's API on crfasrnn's engine: ``import crfasrnn.densecrf as dcrf`` runs pydensecrf programs unchanged.

pydensecrf (lucasb-eyer/pydensecrf, the Python binding of Krähenbühl's dense-CRF code) is what most people use for
dense-CRF post-processing. This module offers its classes and constants with the same semantics and the same numbers
(the same permutohedral lattice, computed in float32; tests compare with pydensecrf2 after 1, 5 and 10 iterations):

.. code-block:: python

    import numpy as np
    import crfasrnn.densecrf as dcrf                        # was: import pydensecrf.densecrf as dcrf
    from crfasrnn.densecrf.utils import unary_from_softmax  # was: from pydensecrf.utils import ...

    d = dcrf.DenseCRF2D(width, height, n_labels)
    d.setUnaryEnergy(unary_from_softmax(probs))             # (n_labels, H·W) energies, −log p
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=image, compat=10)
    Q = d.inference(5)                                      # (n_labels, H·W) marginals
    labels = np.argmax(Q, axis=0).reshape(height, width)

The semantics, in pydensecrf's convention (energies; ``Q`` and the messages are (labels, points)):

* inference starts from ``Q = softmax(−U)`` and iterates ``Q = softmax(−U − Σ_k μ_k (norm_k K_k Q))``;
* a ``compat`` number ``w`` is the Potts model ``μ = −w·I``, a vector ``v`` is ``μ = diag(v)``, a matrix ``m`` is
  ``μ = (m + mᵀ) / 2``;
* the normalisations are those of :mod:`crfasrnn.engine` (``NORMALIZE_SYMMETRIC``, the default, is
  ``√n ⊙ K (√n ⊙ Q)`` with ``n = 1 / (K·1)``);
* ``klDivergence(Q)`` is ``Σ Q log Q + Σ U Q + Σ_k Σ Q ⊙ μ_k (norm_k K_k Q)`` (``Q`` clamped at 1e-20 in the
  logarithm), the mean-field objective up to a constant;
* the kernel type (``DIAG_KERNEL``, ``CONST_KERNEL``, ``FULL_KERNEL``) only matters to pydensecrf's parameter learning,
  which this module does not offer; it is accepted and checked.

Differences: ``inference`` and ``startInference`` return numpy arrays (pydensecrf returns an Eigen-matrix wrapper that
``np.array`` converts; both work with ``np.array``, ``np.argmax(..., axis=0)`` and ``.reshape``); unary energies and
features may be any real dtype (converted to float32; pydensecrf insists on C-contiguous float32); a colour image may be
of any real dtype; ``DenseCRF(..., device="cuda")`` runs on a GPU. For batches and gradients use the engine itself,
:func:`crfasrnn.dense_crf` and :class:`crfasrnn.DenseCRF`. Learning (``LogisticUnary`` parameters, ``gradient``) is
not offered.
"""

from __future__ import annotations

import numbers
from enum import IntEnum
from typing import cast

import numpy as np
import torch

from ..engine import guided_features, marginals_points, mean_field_points, per_axis, position_lattice
from ..errors import InputTypeError
from ..lattice import Backend, PermutohedralLattice, all_finite, filter_each, resolve_backend

__all__ = [
    "CONST_KERNEL",
    "DIAG_KERNEL",
    "FULL_KERNEL",
    "NORMALIZE_AFTER",
    "NORMALIZE_BEFORE",
    "NORMALIZE_SYMMETRIC",
    "NO_NORMALIZATION",
    "ConstUnary",
    "DenseCRF",
    "DenseCRF2D",
    "KernelType",
    "LogisticUnary",
    "NormalizationType",
    "Unary",
]


class KernelType(IntEnum):
    """pydensecrf's kernel types (what its parameter learning may change about a kernel's features)."""

    CONST_KERNEL = 0
    DIAG_KERNEL = 1
    FULL_KERNEL = 2


class NormalizationType(IntEnum):
    """pydensecrf's normalisations of a kernel, in its order (the engine's names: none, before, after, symmetric)."""

    NO_NORMALIZATION = 0
    NORMALIZE_BEFORE = 1
    NORMALIZE_AFTER = 2
    NORMALIZE_SYMMETRIC = 3


CONST_KERNEL, DIAG_KERNEL, FULL_KERNEL = KernelType
NO_NORMALIZATION, NORMALIZE_BEFORE, NORMALIZE_AFTER, NORMALIZE_SYMMETRIC = NormalizationType
_ENGINE_NORMALIZATION = {0: "none", 1: "before", 2: "after", 3: "symmetric"}


def _integer(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputTypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _real_array(name: str, value, ndim: int, *, check_finite: bool = True) -> np.ndarray:
    """``value`` as a float32 array of ``ndim`` dimensions; NaN and Inf refused where ``check_finite`` (features are
    checked by the lattice's construction itself, in its first pass over them)."""
    array = np.asarray(value)
    if array.dtype.kind not in "fiub":
        raise ValueError(f"{name} must be an array of real numbers, got dtype {array.dtype}")
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {array.shape}")
    array = array.astype(np.float32, copy=False)
    if check_finite and array.size and not all_finite(torch.from_numpy(array)):
        raise ValueError(f"{name} {array.shape} contains NaN or Inf")
    return array


def _compatibility(compat, num_labels: int) -> np.ndarray:
    """pydensecrf's label compatibility μ as a (C, C) float32 matrix: Potts, diagonal or (symmetrised) matrix."""
    if isinstance(compat, numbers.Real) and not isinstance(compat, bool):
        return (-np.float32(compat) * np.eye(num_labels, dtype=np.float32)).astype(np.float32)
    array = np.asarray(compat)
    if array.ndim == 1:
        if array.shape[0] != num_labels:
            raise ValueError(f"a compatibility vector needs one value per label ({num_labels}), got {array.shape}")
        return np.diag(_real_array("compat", array, 1))
    if array.ndim == 2:
        if array.shape != (num_labels, num_labels):
            raise ValueError(f"a compatibility matrix must be ({num_labels}, {num_labels}), got {array.shape}")
        m = _real_array("compat", array, 2)
        return (np.float32(0.5) * (m + m.T)).astype(np.float32)
    raise ValueError("LabelCompatibility of dimension >2 not meaningful.")


class Unary:
    """A unary term for :meth:`DenseCRF.setUnary` (pydensecrf's base class)."""

    def energy(self) -> np.ndarray:  # pragma: no cover - the subclasses say
        raise NotImplementedError


class ConstUnary(Unary):
    """Fixed unary energies ``u`` (labels, points), as :meth:`DenseCRF.setUnaryEnergy` takes them."""

    def __init__(self, u) -> None:
        self._u = _real_array("unary energy", u, 2)

    def energy(self) -> np.ndarray:
        return self._u


class LogisticUnary(Unary):
    """pydensecrf's logistic unary ``L @ f`` (labels × features, features × points); its learning is not offered."""

    def __init__(self, L, f) -> None:
        self._L = _real_array("L", L, 2)
        self._f = _real_array("f", f, 2)
        if self._L.shape[1] != self._f.shape[0]:
            raise ValueError(f"L {self._L.shape} and f {self._f.shape} do not multiply")

    def energy(self) -> np.ndarray:
        return self._L @ self._f


class _Pairwise:
    """One pairwise term: its lattice, its compatibility μ (C, C) and its normalisation (the engine's mode code)."""

    def __init__(self, lattice: PermutohedralLattice, mu: torch.Tensor, normalization: int) -> None:
        self.lattice = lattice
        # The engine's q = u − m A over rows m of messages takes A = μᵀ, which is μ: all three forms are symmetric.
        self.mu = mu
        self.normalization = normalization


class DenseCRF:
    """A dense CRF over ``nvar`` points with ``nlabels`` labels and features you give (pydensecrf's ``DenseCRF``).

    Args:
        nvar: number of points N.
        nlabels: number of labels C.
        device: where to compute (``None``: the CPU); results come back as numpy arrays.
        backend: the lattice back end (``"auto"``: numba on the CPU where installed, else torch; ``"torch"`` is the
            CUDA path, also on the CPU).

    Example:
        >>> d = DenseCRF(6, 2)
        >>> d.setUnaryEnergy(np.array([[0, 0, 0, 3, 3, 3], [3, 3, 3, 0, 0, 0]], np.float32))
        >>> d.addPairwiseEnergy(np.arange(6, dtype=np.float32)[None] / 2, compat=3)
        >>> np.argmax(d.inference(5), axis=0)
        array([0, 0, 0, 1, 1, 1])
    """

    def __init__(
        self, nvar: int, nlabels: int, *, device: str | torch.device | None = None, backend: str = "auto"
    ) -> None:
        self._nvar = _integer("nvar", nvar)
        self._nlabel = _integer("nlabels", nlabels)
        self._device = torch.device("cpu" if device is None else device)
        # resolve_backend is annotated -> str, but returns one of the names of Backend ("torch" or "numba")
        self._backend = cast(Backend, resolve_backend(backend, self._device))
        self._scores: torch.Tensor | None = None  # (1, N, C) −U
        self._pairwise: list[_Pairwise] = []

    # --- set-up ------------------------------------------------------------------------------------------------------

    def setUnaryEnergy(self, u, f=None) -> None:
        """Set the unary energies ``u`` (nlabels, nvar), ``−log p`` (with ``f``: the logistic unary ``u @ f``)."""
        if f is not None:
            self.setUnary(LogisticUnary(u, f))
            return
        u = _real_array("unary energy", u, 2)
        self._set_unary(u)

    def setUnary(self, u: Unary) -> None:
        """Set the unary from a :class:`ConstUnary` or :class:`LogisticUnary`."""
        if not isinstance(u, Unary):
            raise InputTypeError(f"setUnary takes a Unary, got {type(u).__name__}")
        self._set_unary(u.energy())

    def _set_unary(self, u: np.ndarray) -> None:
        if u.shape != (self._nlabel, self._nvar):
            raise ValueError(f"Bad shape for unary energy (Need {(self._nlabel, self._nvar)}, got {u.shape})")
        # kept once, as the engine takes it: scores −U in point layout (N, C), which is also pydensecrf's memory order
        scores = torch.empty((1, self._nvar, self._nlabel), dtype=torch.float32, device=self._device)
        torch.neg(torch.from_numpy(u).to(self._device).t(), out=scores[0])
        self._scores = scores

    def addPairwiseEnergy(self, features, compat, kernel=DIAG_KERNEL, normalization=NORMALIZE_SYMMETRIC):
        """Add a Gaussian kernel over ``features`` (d, nvar), already divided by their bandwidths.

        Args:
            features: (d, nvar) features (see :mod:`crfasrnn.densecrf.utils`).
            compat: a number (Potts), a (nlabels,) vector (diagonal) or a (nlabels, nlabels) matrix.
            kernel: ``DIAG_KERNEL``, ``CONST_KERNEL`` or ``FULL_KERNEL``.
            normalization: ``NO_NORMALIZATION``, ``NORMALIZE_BEFORE``, ``NORMALIZE_AFTER`` or ``NORMALIZE_SYMMETRIC``.
        """
        features = _real_array("features", features, 2, check_finite=False)
        if features.shape[1] != self._nvar:
            raise ValueError(f"Bad shape for pairwise energy (Need (?, {self._nvar}), got {features.shape})")
        self._add(torch.from_numpy(np.ascontiguousarray(features))[None], compat, kernel, normalization)

    def _add(self, features, compat, kernel, normalization) -> None:
        """Check everything, then build the lattice of (1, d, *spatial) features, or take a built one (a function of
        it, so that it is built only after the checks); nothing is kept on an error."""
        if kernel not in (0, 1, 2) or isinstance(kernel, bool):
            raise ValueError(f"kernel must be DIAG_KERNEL, CONST_KERNEL or FULL_KERNEL, got {kernel!r}")
        if normalization not in (0, 1, 2, 3) or isinstance(normalization, bool):
            raise ValueError(
                "normalization must be NO_NORMALIZATION, NORMALIZE_BEFORE, NORMALIZE_AFTER or "
                f"NORMALIZE_SYMMETRIC, got {normalization!r}"
            )
        mu = torch.from_numpy(_compatibility(compat, self._nlabel)).to(self._device)
        if callable(features):
            lattice = features()
        else:
            # pydensecrf's SSE lattice adds the vertices of the zero vectors that pad the points to a multiple of 4
            # compact: pydensecrf keeps one index and one weight per point and vertex; so does a compact lattice
            lattice = PermutohedralLattice(features.to(self._device), backend=self._backend, pad_to=4, compact=True)
        self._pairwise.append(_Pairwise(lattice, mu, int(normalization)))

    # --- inference ---------------------------------------------------------------------------------------------------

    def _unary_scores(self) -> torch.Tensor:
        """``−U`` as (1, N, C) (zeros where no unary was set, as pydensecrf does)."""
        if self._scores is None:
            return torch.zeros(1, self._nvar, self._nlabel, device=self._device)
        return self._scores

    def inference(self, niter: int) -> np.ndarray:
        """Run ``niter`` mean-field iterations from ``softmax(−U)``; returns the marginals Q (nlabels, nvar) float32.

        The array is laid out as pydensecrf's (point-major: ``Q.T`` is C-contiguous).
        """
        niter = _integer("niter", niter, 0)
        scores = self._unary_scores()
        with torch.no_grad():
            if niter > 0 and self._pairwise:
                scores = mean_field_points(
                    scores,
                    [p.lattice.tensors for p in self._pairwise],
                    [p.mu for p in self._pairwise],
                    [p.normalization for p in self._pairwise],
                    niter,
                )
            return marginals_points(scores[0].contiguous()).cpu().numpy().T

    def startInference(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The marginals before any iteration, ``softmax(−U)``, and two scratch arrays for :meth:`stepInference`."""
        return self.inference(0), np.empty((0, 0), np.float32), np.empty((0, 0), np.float32)

    def stepInference(self, Q, tmp1=None, tmp2=None) -> None:
        """One mean-field iteration from the marginals ``Q`` (nlabels, nvar), updating ``Q`` in place.

        ``tmp1`` and ``tmp2`` are pydensecrf's scratch matrices; where ``tmp1`` is a (nlabels, nvar) float32 array it
        receives the scores before the softmax.
        """
        q = self._marginals("Q", Q)
        if not q.flags.writeable:
            raise ValueError("Q must be a writeable array: stepInference updates it in place")
        with torch.no_grad():
            current = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)).to(self._device)
            scores = self._unary_scores()[0].t().clone()
            for pairwise, message in zip(self._pairwise, self._messages(current)):
                scores -= pairwise.mu @ message
            if isinstance(tmp1, np.ndarray) and tmp1.shape == q.shape and tmp1.dtype == np.float32:
                tmp1[...] = scores.cpu().numpy()
            q[...] = torch.softmax(scores, dim=0).cpu().numpy()

    def klDivergence(self, Q) -> float:
        """The KL divergence of the marginals ``Q`` (nlabels, nvar) from the CRF's distribution, up to a constant."""
        q = self._marginals("Q", Q).astype(np.float64)
        kl = float(np.sum(q * np.log(np.maximum(q, 1e-20))))
        if self._scores is not None:
            kl -= float(np.sum(self._scores[0].t().cpu().double().numpy() * q))
        with torch.no_grad():
            current = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)).to(self._device)
            for pairwise, message in zip(self._pairwise, self._messages(current)):
                kl += float((current.double() * (pairwise.mu @ message).double()).sum())
        return kl

    def _marginals(self, name: str, value) -> np.ndarray:
        array = np.asarray(value)
        if array.shape != (self._nlabel, self._nvar):
            raise ValueError(f"Bad shape for {name} (Need {(self._nlabel, self._nvar)}, got {array.shape})")
        if array.dtype.kind != "f":
            raise ValueError(f"{name} must be a floating array, got dtype {array.dtype}")
        return array

    def _messages(self, q: torch.Tensor) -> list[torch.Tensor]:
        """``norm_k K_k Q`` for every kernel, (C, N) each, from (C, N) marginals."""
        if not self._pairwise:
            return []
        points = q.t().contiguous()[None].float()
        filtered = filter_each(
            points, [p.lattice for p in self._pairwise], modes=[p.normalization for p in self._pairwise]
        )
        return [f[0].t() for f in filtered]


class DenseCRF2D(DenseCRF):
    """A dense CRF over the pixels of a ``w`` × ``h`` image (pydensecrf's ``DenseCRF2D``): pixel ``y·w + x``.

    Example:
        >>> image = np.zeros((4, 6, 3), np.uint8); image[:, 3:] = 200
        >>> d = DenseCRF2D(6, 4, 2)
        >>> d.setUnaryEnergy(np.full((2, 24), 0.69, np.float32))
        >>> d.addPairwiseBilateral(sxy=5, srgb=13, rgbim=image, compat=4)
        >>> d.inference(3).shape
        (2, 24)
    """

    def __init__(
        self, w: int, h: int, nlabels: int, *, device: str | torch.device | None = None, backend: str = "auto"
    ) -> None:
        self._w = _integer("w", w)
        self._h = _integer("h", h)
        super().__init__(self._w * self._h, nlabels, device=device, backend=backend)

    def addPairwiseGaussian(self, sxy, compat, kernel=DIAG_KERNEL, normalization=NORMALIZE_SYMMETRIC):
        """A Gaussian kernel over positions: features ``(x / sx, y / sy)``; ``sxy`` is a number or ``(sx, sy)``."""
        sx, sy = per_axis("sxy", sxy, 2)
        like = torch.empty(0, device=self._device)
        # positions only: the lattice depends on the size alone and is kept for the next CRF of this size
        self._add(
            lambda: position_lattice((self._h, self._w), (sy, sx), like=like, backend=self._backend, compact=True),
            compat,
            kernel,
            normalization,
        )

    def addPairwiseBilateral(self, sxy, srgb, rgbim, compat, kernel=DIAG_KERNEL, normalization=NORMALIZE_SYMMETRIC):
        """A Gaussian kernel over positions and colours: ``(x/sx, y/sy, r/sr, g/sg, b/sb)``.

        Args:
            sxy: positional bandwidth, a number or ``(sx, sy)``.
            srgb: colour bandwidth, a number or ``(sr, sg, sb)``.
            rgbim: (h, w, 3) colour image (uint8 in pydensecrf; any real dtype here, in the units of ``srgb``).
            compat, kernel, normalization: as in :meth:`DenseCRF.addPairwiseEnergy`.
        """
        sx, sy = per_axis("sxy", sxy, 2)
        srgb = per_axis("srgb", srgb, 3)
        image = np.asarray(rgbim)
        if image.ndim != 3 or image.shape[0] != self._h or image.shape[1] != self._w:
            raise ValueError(f"Bad shape for pairwise bilateral (Need {(self._h, self._w, 3)}, got {image.shape})")
        if image.shape[2] != 3:
            raise ValueError(
                "addPairwiseBilateral only works for RGB images. For other types, use "
                "`utils.create_pairwise_bilateral` to construct your own pairwise energy and add it "
                "through `addPairwiseEnergy`."
            )
        colours = torch.from_numpy(_real_array("rgbim", image, 3, check_finite=False)).permute(2, 0, 1)[None]
        self._add(guided_features(colours, (sy, sx), srgb), compat, kernel, normalization)
