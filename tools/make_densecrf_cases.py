"""Write tests/reference/densecrf_cases.npz: pydensecrf's numbers, for the drop-in's tests.

Run where pydensecrf2 is installed (``make bench-setup``): ``.venv/bin/python tools/make_densecrf_cases.py``.
Every case is made from a seeded random image (or volume) and unary, so the tests rebuild the inputs themselves and
only the results are stored:

* ``img_{norm}_{compat}_q{T}``: Q of a ``DenseCRF2D`` (16 × 20, 3 labels) with a Gaussian and a bilateral kernel after
  T = 1, 5, 10 iterations, for every normalisation and compatibility form (``potts``, ``diag``, ``matrix``; the
  bilateral kernel carries the form, the kernel type cycles through the three), ``img_..._kl`` its
  ``klDivergence(Q5)`` and ``img_..._step`` Q after ``startInference`` and three ``stepInference``;
* ``vol_...``: the same for a generic ``DenseCRF`` over a 6 × 8 × 10 volume with one intensity channel, its features
  made with ``utils.create_pairwise_gaussian`` and ``utils.create_pairwise_bilateral`` (the 4-D features of 3-D CRFs);
* ``odd_img_q{T}`` and ``odd_vol_q{T}``: a 15 × 21 image and a 5 × 7 × 9 volume (point counts not multiples of 4, dark
  near the origin of the features), where pydensecrf's SSE lattice adds the vertices of the zero vectors it pads the
  points with (docs/reference.md §3.4; the drop-in reproduces them);
* ``utils_*``: the helpers' outputs (see ``inputs`` below).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "tests" / "reference" / "densecrf_cases.npz"
NORMALIZATIONS = {"none": 0, "before": 1, "after": 2, "symmetric": 3}  # pydensecrf's NormalizationType values
KERNELS = ["DIAG_KERNEL", "CONST_KERNEL", "FULL_KERNEL"]  # cycled through the cases
LABELS = 3
IMAGE = (16, 20)
VOLUME = (6, 8, 10)
ODD_IMAGE = (15, 21)
ODD_VOLUME = (5, 7, 9)


def inputs():
    """The seeded inputs (the tests import this function: keep it free of pydensecrf)."""
    rs = np.random.RandomState(7)
    image = rs.randint(0, 256, size=(*IMAGE, 3)).astype(np.uint8)
    image_unary = np.ascontiguousarray(rs.uniform(0.1, 3.0, size=(LABELS, IMAGE[0] * IMAGE[1])).astype(np.float32))
    volume = (rs.rand(*VOLUME) * 100).astype(np.float32)
    volume_unary = np.ascontiguousarray(rs.uniform(0.1, 3.0, size=(LABELS, int(np.prod(VOLUME)))).astype(np.float32))
    compat = {
        "potts": 4.0,
        "diag": np.array([-3.0, -1.0, 2.0], np.float32),
        "matrix": rs.uniform(-3, 1, size=(LABELS, LABELS)).astype(np.float32),
    }
    labels = rs.randint(0, LABELS + 1, size=IMAGE)
    probs = rs.dirichlet(np.ones(LABELS), size=IMAGE).transpose(2, 0, 1).astype(np.float32)
    return image, image_unary, volume, volume_unary, compat, labels, probs


def odd_inputs():
    """Inputs whose point counts are not multiples of 4, dark near the features' origin (where phantoms matter)."""
    rs = np.random.RandomState(8)
    image = rs.randint(0, 256, size=(*ODD_IMAGE, 3)).astype(np.uint8)
    image[:4, :4] = rs.randint(0, 12, size=(4, 4, 3))
    image_unary = np.ascontiguousarray(rs.uniform(0.1, 3.0, size=(LABELS, int(np.prod(ODD_IMAGE)))).astype(np.float32))
    volume = (rs.rand(*ODD_VOLUME) * 100).astype(np.float32)
    volume[:2, :2, :2] = rs.rand(2, 2, 2) * 5
    volume_unary = np.ascontiguousarray(
        rs.uniform(0.1, 3.0, size=(LABELS, int(np.prod(ODD_VOLUME)))).astype(np.float32)
    )
    return image, image_unary, volume, volume_unary


def build_odd(dcrf, utils, kind: str):
    """The odd-size CRFs (the same calls for pydensecrf and the drop-in)."""
    image, image_unary, volume, volume_unary = odd_inputs()
    if kind == "img":
        d = dcrf.DenseCRF2D(ODD_IMAGE[1], ODD_IMAGE[0], LABELS)
        d.setUnaryEnergy(image_unary)
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=4, srgb=6, rgbim=image, compat=5)
        return d
    d = dcrf.DenseCRF(int(np.prod(ODD_VOLUME)), LABELS)
    d.setUnaryEnergy(volume_unary)
    d.addPairwiseEnergy(utils.create_pairwise_gaussian((1.0, 2.0, 2.0), ODD_VOLUME), compat=2)
    d.addPairwiseEnergy(utils.create_pairwise_bilateral((2.0, 2.0, 2.0), 4.0, volume, chdim=-1), compat=5)
    return d


def weight(norm: str) -> float:
    """Unnormalised kernels sum tens of Gaussians: a smaller weight keeps their energies in a realistic range."""
    return 0.05 if norm == "none" else 1.0


def run(crf, out: dict, prefix: str) -> None:
    for t in (1, 5, 10):
        out[f"{prefix}_q{t}"] = np.array(crf.inference(t))
    out[f"{prefix}_kl"] = np.float64(crf.klDivergence(crf.inference(5)))
    q, tmp1, tmp2 = crf.startInference()
    for _ in range(3):
        crf.stepInference(q, tmp1, tmp2)
    out[f"{prefix}_step"] = np.array(q)


def main() -> int:
    import pydensecrf.densecrf as dcrf  # here, not at the top: the tests import inputs() without pydensecrf
    from pydensecrf import utils

    image, image_unary, volume, volume_unary, compat, labels, probs = inputs()
    out: dict[str, np.ndarray] = {}
    h, w = IMAGE
    volume_gaussian = utils.create_pairwise_gaussian((2.0, 3.0, 3.0), VOLUME)
    volume_bilateral = utils.create_pairwise_bilateral((3.0, 5.0, 5.0), (10.0,), volume, chdim=-1)
    for i, (norm, code) in enumerate(NORMALIZATIONS.items()):
        code = dcrf.NormalizationType(code)
        for j, (form, c) in enumerate(compat.items()):
            kernel = getattr(dcrf, KERNELS[(i + j) % 3])
            scaled = c * weight(norm)
            d = dcrf.DenseCRF2D(w, h, LABELS)
            d.setUnaryEnergy(image_unary)
            d.addPairwiseGaussian(sxy=(3, 2), compat=3 * weight(norm), kernel=kernel, normalization=code)
            d.addPairwiseBilateral(
                sxy=(12, 9), srgb=(20, 13, 30), rgbim=image, compat=scaled, kernel=kernel, normalization=code
            )
            run(d, out, f"img_{norm}_{form}")
            d = dcrf.DenseCRF(int(np.prod(VOLUME)), LABELS)
            d.setUnaryEnergy(volume_unary)
            d.addPairwiseEnergy(volume_gaussian, compat=2 * weight(norm), kernel=kernel, normalization=code)
            d.addPairwiseEnergy(volume_bilateral, compat=scaled, kernel=kernel, normalization=code)
            run(d, out, f"vol_{norm}_{form}")
    for kind in ("img", "vol"):
        d = build_odd(dcrf, utils, kind)
        for t in (1, 5, 10):
            out[f"odd_{kind}_q{t}"] = np.array(d.inference(t))
    out["utils_labels_unsure"] = utils.unary_from_labels(labels, LABELS, gt_prob=0.7, zero_unsure=True)
    out["utils_labels_sure"] = utils.unary_from_labels(labels % LABELS, LABELS, gt_prob=0.6, zero_unsure=False)
    out["utils_softmax"] = utils.unary_from_softmax(probs)
    out["utils_softmax_scaled"] = utils.unary_from_softmax(probs, scale=0.8, clip=1e-3)
    out["utils_gaussian"] = utils.create_pairwise_gaussian((2.0, 3.0, 3.0), VOLUME)
    out["utils_bilateral_rgb"] = utils.create_pairwise_bilateral((5.0, 4.0), (13.0, 20.0, 30.0), image, chdim=2)
    out["utils_bilateral_gray"] = utils.create_pairwise_bilateral((3.0, 5.0, 5.0), 10.0, volume, chdim=-1)
    from importlib.metadata import version

    out["meta_source"] = np.array(f"pydensecrf2 {version('pydensecrf2')}, numpy {np.__version__}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e3:.0f} kB, {len(out)} arrays)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
