"""Rebuild the inputs of the CRF-RNN reference cases from their seeds, with numpy only.

``tests/reference/case_a_small_random.npz`` and ``case_d_permutohedral_raw.npz`` hold the results of running the
PyTorch port of CRF-RNN (sadeepj/crfasrnn_pytorch) together with the inputs it was given. The results cannot be
recomputed without that port's C++ extension, but the inputs can: they come from seeded ``np.random.RandomState``
draws and float32 divisions, which this module repeats (see docs/reference-cases.md). Every array it returns is
bit-identical to the stored one, dtype included.

Run ``.venv/bin/python tools/make_reference_inputs.py`` to compare with the stored files (exit status 1 on a
mismatch); ``tests/test_reference_inputs.py`` imports the functions below.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "tests" / "reference"
CASE_A_FILE = REFERENCE_DIR / "case_a_small_random.npz"
CASE_D_FILE = REFERENCE_DIR / "case_d_permutohedral_raw.npz"

#: Provenance recorded in the ``meta_*`` keys of both files.
REFERENCE_REPO = "github.com/sadeepj/crfasrnn_pytorch"
REFERENCE_COMMIT = "24899c528981dfbc14f1212869a3eae328dc6570"

#: Keys of case a that hold the port's results (everything else but ``meta_*`` is an input).
CASE_A_OUTPUTS = (
    "output",
    "outputs_per_iteration",
    "output_10it",
    "grad_unary",
    "grad_spatial_ker_weights",
    "grad_bilateral_ker_weights",
    "grad_compatibility_matrix",
    "spatial_norm",
    "bilateral_norm",
    "iter1_softmax",
    "iter1_spatial_filtered",
    "iter1_bilateral_filtered",
)

#: Keys of case d that hold the port's results: five per feature set.
CASE_D_OUTPUTS = tuple(
    f"{tag}_{key}"
    for tag in ("bilateral", "spatial")
    for key in ("out_raw", "ones_raw", "out_normalized", "out_reverse_raw", "out_raw_2ch")
)


def _scalar(value, dtype=np.float32) -> np.ndarray:
    """A 0-d array, as ``np.savez`` stores a scalar."""
    return np.asarray(value, dtype=dtype)


def case_a_inputs() -> dict[str, np.ndarray]:
    """The inputs and parameters of case a: the CRF-RNN layer on a 30 × 40 random image, 3 labels.

    ``image`` is (H, W, 3) uint8, ``image_fed`` the (3, H, W) float32 tensor the layer was given (raw RGB, no mean
    subtraction), ``unary`` the (3, H, W) logits, ``G`` the weights of the loss ``sum(output * G)``. The features are
    those the port computes: ``(x/θγ, y/θγ)`` and ``(x/θα, y/θα, image_fed/θβ)``, x the column and y the row,
    float32 divisions. The kernel matrices are the port's initial values (its sign: compatibility ``+I``).
    """
    h, w, c = 30, 40, 3
    rs = np.random.RandomState(0)
    image = rs.randint(0, 256, size=(h, w, 3)).astype(np.uint8)
    unary = (rs.standard_normal((c, h, w)) * 2).astype(np.float32)  # float64 product, rounded once
    g = np.random.RandomState(2).standard_normal((c, h, w)).astype(np.float32)
    image_fed = image.astype(np.float32).transpose(2, 0, 1)

    theta_alpha, theta_beta, theta_gamma = np.float32(160.0), np.float32(3.0), np.float32(3.0)
    xx = np.tile(np.arange(w, dtype=np.float32), (h, 1))  # torch.arange(w).repeat([h, 1]) in the port
    yy = np.tile(np.arange(h, dtype=np.float32)[:, None], (1, w))
    spatial = np.stack([xx / theta_gamma, yy / theta_gamma], axis=2)
    bilateral = np.concatenate(
        [np.stack([xx / theta_alpha, yy / theta_alpha], axis=2), (image_fed / theta_beta).transpose(1, 2, 0)], axis=2
    )
    eye = np.eye(c, dtype=np.float32)
    return {
        "image": image,
        "image_fed": image_fed,
        "unary": unary,
        "G": g,
        "spatial_features": spatial,
        "bilateral_features": bilateral,
        "theta_alpha": _scalar(theta_alpha),
        "theta_beta": _scalar(theta_beta),
        "theta_gamma": _scalar(theta_gamma),
        "num_iterations": _scalar(5, np.int64),
        "spatial_ker_weight": _scalar(3.0),
        "bilateral_ker_weight": _scalar(5.0),
        "spatial_ker_weights": 3 * eye,
        "bilateral_ker_weights": 5 * eye,
        "compatibility_matrix": eye.copy(),
    }


def case_d_inputs() -> dict[str, np.ndarray]:
    """The inputs of case d: the raw lattice filter of 4 channels over a 50 × 60 random image.

    ``values`` is (4, H, W) float32; ``features_bilateral`` (H, W, 5) is ``(x/sx, y/sx, R/sr, G/sr, B/sr)`` and
    ``features_spatial`` (H, W, 2) is ``(x/sg, y/sg)``, float32 divisions; ``eps`` is the port's normaliser ε.
    """
    h, w = 50, 60
    rs = np.random.RandomState(4)
    image = rs.randint(0, 256, size=(h, w, 3)).astype(np.uint8)
    values = rs.standard_normal((4, h, w)).astype(np.float32)
    sx, sr, sg = 8.0, 25.0, 3.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    imf = image.astype(np.float32)
    sx32, sr32, sg32 = np.float32(sx), np.float32(sr), np.float32(sg)
    bilateral = np.stack([xx / sx32, yy / sx32, imf[..., 0] / sr32, imf[..., 1] / sr32, imf[..., 2] / sr32], axis=2)
    spatial = np.stack([xx / sg32, yy / sg32], axis=2)
    return {
        "image": image,
        "values": values,
        "features_bilateral": bilateral,
        "features_spatial": spatial,
        "sx": _scalar(sx),
        "sr": _scalar(sr),
        "sg": _scalar(sg),
        "eps": _scalar(np.finfo(np.float64).eps, np.float64),
    }


def compare(generated: dict[str, np.ndarray], stored: dict[str, np.ndarray], outputs: tuple[str, ...]) -> list[str]:
    """What differs between regenerated inputs and a case file's arrays (empty when all are bit-identical).

    Every generated key must be stored with the same dtype, shape and values, and every stored key must be a
    generated input, a listed output or a ``meta_*`` key.
    """
    problems = []
    for key, array in generated.items():
        if key not in stored:
            problems.append(f"{key}: not in the file")
            continue
        ref = stored[key]
        if array.dtype != ref.dtype or array.shape != ref.shape:
            problems.append(f"{key}: {array.dtype}{array.shape} generated, {ref.dtype}{ref.shape} stored")
        elif not np.array_equal(array, ref):
            problems.append(f"{key}: {int(np.count_nonzero(array != ref))} of {ref.size} values differ")
    known = set(generated) | set(outputs)
    problems.extend(
        f"{key}: stored but neither an input nor a known output"
        for key in stored
        if key not in known and not key.startswith("meta_")
    )
    return problems


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {key: f[key] for key in f.files}


def main() -> int:
    status = 0
    for path, make, outputs in (
        (CASE_A_FILE, case_a_inputs, CASE_A_OUTPUTS),
        (CASE_D_FILE, case_d_inputs, CASE_D_OUTPUTS),
    ):
        generated = make()
        problems = compare(generated, load(path), outputs)
        if problems:
            status = 1
            print(f"{path.name}: MISMATCH")
            for problem in problems:
                print(f"  {problem}")
        else:
            print(f"{path.name}: all {len(generated)} input arrays identical ({', '.join(generated)})")
    return status


if __name__ == "__main__":
    sys.exit(main())
