"""`crfasrnn refine` of 3-D volumes: .npy and NIfTI in and out, the spacing, probabilities, one-line errors."""

from __future__ import annotations

import gzip
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crfasrnn.cli import main
from crfasrnn.volume import read_volume, refine_volume

SHAPE = (12, 16, 16)
UNKNOWN = 255


def sphere_scene(shape=SHAPE, radius=5.0, shift=2.0):
    """A bright ball in a dark box (with a little noise), and rough labels of it: the ball shifted by ``shift`` voxels
    along the last axis, with a band of unknown (255) one voxel either side of the shifted boundary (so that about a
    voxel of the labelled part is wrong)."""
    z, y, x = np.indices(shape, dtype=np.float64)
    centre = [(s - 1) / 2 for s in shape]
    truth = np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) < radius
    rng = np.random.default_rng(0)
    volume = (np.where(truth, 180.0, 40.0) + rng.normal(0, 4, shape)).astype(np.float32)
    r = np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2] - shift) ** 2)
    rough = (r < radius).astype(np.uint8)
    rough[np.abs(r - radius) < 1.0] = UNKNOWN
    return volume, rough, truth


def agreement(result: np.ndarray, truth: np.ndarray) -> float:
    return float((result == truth).mean())


def run(*args) -> int:
    return main(["refine", *map(str, args)])


# --- .npy ------------------------------------------------------------------------------------------------------------


def test_npy_labels_recover_the_true_boundary(tmp_path, capsys):
    volume, rough, truth = sphere_scene()
    known = rough != UNKNOWN
    assert agreement(rough[known], truth[known]) < 0.98  # the rough labels are wrong beyond the band
    np.save(tmp_path / "vol.npy", volume)
    np.save(tmp_path / "lab.npy", rough)
    out = tmp_path / "out.npy"
    assert run(tmp_path / "vol.npy", "--labels", tmp_path / "lab.npy", "-o", out) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith(f"wrote {out} (12x16x16 voxels, spacing 1x1x1, 2 classes")
    assert re.search(
        r"changed the label of [1-9]\d* of \d+ labelled voxels and labelled \d+ unknown voxels", printed[0]
    )
    result = np.load(out)
    assert result.dtype == np.uint8 and result.shape == SHAPE
    assert agreement(result, truth) >= 0.99


def test_npy_volume_with_a_channel_axis(tmp_path):
    volume, rough, truth = sphere_scene()
    second = 220.0 - volume  # a second "modality": the same edge, inverted contrast
    np.save(tmp_path / "vol.npy", np.stack([volume, second], axis=-1))  # (D, H, W, 2)
    np.save(tmp_path / "lab.npy", rough.astype(np.int16))
    out = tmp_path / "out.npy"
    assert run(tmp_path / "vol.npy", "--labels", tmp_path / "lab.npy", "-o", out) == 0
    assert agreement(np.load(out), truth) >= 0.99


def test_npy_probabilities_and_normalize(tmp_path):
    volume, _, truth = sphere_scene()
    _, shifted, _ = sphere_scene(shift=1.5)
    fg = np.where(shifted == 1, 0.65, 0.35).astype(np.float32)
    fg[shifted == UNKNOWN] = 0.5
    probs = np.stack([1 - fg, fg])  # (C, D, H, W)
    np.save(tmp_path / "vol.npy", volume)
    np.save(tmp_path / "p.npy", probs)
    np.save(tmp_path / "p3.npy", probs * 3)  # sums of 3: refused without --normalize
    out = tmp_path / "out.npy"
    assert run(tmp_path / "vol.npy", "--probs", tmp_path / "p.npy", "-o", out) == 0
    assert agreement(np.load(out), truth) >= 0.99
    out3 = tmp_path / "out3.npy"
    assert run(tmp_path / "vol.npy", "--probs", tmp_path / "p3.npy", "-o", out3, "--normalize") == 0
    np.testing.assert_array_equal(np.load(out3), np.load(out))


def test_many_classes_are_written_as_int32(tmp_path):
    volume, rough, _ = sphere_scene()
    np.save(tmp_path / "vol.npy", volume)
    np.save(tmp_path / "lab.npy", rough)
    out = tmp_path / "out.npy"
    assert (
        run(
            tmp_path / "vol.npy",
            "--labels",
            tmp_path / "lab.npy",
            "-o",
            out,
            "--num-classes",
            "300",
            "--iterations",
            "0",
        )
        == 0
    )
    assert np.load(out).dtype == np.int32


def test_default_output_name(tmp_path, monkeypatch, capsys):
    volume, rough, _ = sphere_scene()
    np.save(tmp_path / "vol.npy", volume)
    np.save(tmp_path / "lab.npy", rough)
    monkeypatch.chdir(tmp_path)
    assert run("vol.npy", "--labels", "lab.npy", "--iterations", "1") == 0
    assert (tmp_path / "vol_refined.npy").is_file()
    assert capsys.readouterr().out.startswith("wrote vol_refined.npy")


def plate_scene():
    """A flat volume and labels with a one-voxel-thick plate of label 1 across axis 0. With the spatial kernel alone
    the plate survives when axis 0 is spaced far apart (its neighbours across are then far away), and is smoothed away
    when the spacing is isotropic."""
    volume = np.zeros(SHAPE, np.float32)
    labels = np.zeros(SHAPE, np.uint8)
    labels[6] = 1
    return volume, labels


def test_spacing_changes_the_result():
    volume, labels = plate_scene()
    iso = refine_volume(volume, labels=labels, spacing=1.0, bilateral_weight=0.0)
    aniso = refine_volume(volume, labels=labels, spacing=(10.0, 1.0, 1.0), bilateral_weight=0.0)
    assert iso.sum() == 0 and (aniso == labels).all()


def test_npy_spacing_option(tmp_path):
    volume, labels = plate_scene()
    np.save(tmp_path / "vol.npy", volume)
    np.save(tmp_path / "lab.npy", labels)
    common = ["--labels", tmp_path / "lab.npy", "--bilateral-weight", "0"]
    assert run(tmp_path / "vol.npy", *common, "-o", tmp_path / "iso.npy") == 0
    assert run(tmp_path / "vol.npy", *common, "-o", tmp_path / "aniso.npy", "--spacing", "10", "1", "1") == 0
    assert np.load(tmp_path / "iso.npy").sum() == 0
    np.testing.assert_array_equal(np.load(tmp_path / "aniso.npy"), labels)


def test_importing_crfasrnn_does_not_import_nibabel():
    code = "import sys, crfasrnn, crfasrnn.cli, crfasrnn.volume; assert 'nibabel' not in sys.modules, 'imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


# --- NIfTI -----------------------------------------------------------------------------------------------------------


def nifti(path: Path, data: np.ndarray, zooms=(1.0, 1.0, 1.0), *, dtype=None) -> np.ndarray:
    """Write ``data`` as NIfTI with a rotated, shifted affine of the given voxel sizes; returns the affine."""
    nib = pytest.importorskip("nibabel")
    c, s = np.cos(0.3), np.sin(0.3)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(zooms)
    affine[:3, 3] = (-20.0, 5.5, 12.0)
    image = nib.Nifti1Image(data, affine)
    if dtype is not None:
        image.set_data_dtype(dtype)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, path)
    return affine


def set_raw_pixdim(path: Path, axis: int, value: float) -> None:
    """Overwrite pixdim[1 + axis] of a little-endian NIfTI-1 file in place (nibabel repairs 0 or < 0 when it loads)."""
    gz = path.name.endswith(".gz")
    raw = bytearray(gzip.decompress(path.read_bytes()) if gz else path.read_bytes())
    offset = 80 + 4 * axis
    raw[offset : offset + 4] = np.float32(value).tobytes()
    path.write_bytes(gzip.compress(bytes(raw)) if gz else bytes(raw))


@pytest.mark.parametrize("ending", [".nii", ".nii.gz"])
def test_nifti_labels_keep_affine_header_and_shape(tmp_path, ending):
    nib = pytest.importorskip("nibabel")
    volume, rough, truth = sphere_scene()
    zooms = (1.0, 1.0, 1.0)
    affine = nifti(tmp_path / f"vol{ending}", volume, zooms)
    nifti(tmp_path / f"lab{ending}", rough)
    out = tmp_path / f"out{ending}"
    assert run(tmp_path / f"vol{ending}", "--labels", tmp_path / f"lab{ending}", "-o", out) == 0
    if ending == ".nii.gz":
        assert out.read_bytes()[:2] == b"\x1f\x8b"  # gzip
        gzip.decompress(out.read_bytes())
    image = nib.load(out)
    assert image.shape == SHAPE
    np.testing.assert_allclose(image.affine, affine, atol=1e-6)
    np.testing.assert_allclose(image.header.get_zooms(), zooms)
    assert image.header.get_xyzt_units() == ("mm", "sec")
    assert image.get_data_dtype() == np.uint8
    assert image.header.get_intent()[0] == "label"
    result = np.asanyarray(image.dataobj)
    assert result.dtype == np.uint8
    assert agreement(result, truth) >= 0.99


def test_nifti_multichannel_volume_and_probabilities(tmp_path):
    nib = pytest.importorskip("nibabel")
    volume, _, truth = sphere_scene()
    _, shifted, _ = sphere_scene(shift=1.5)
    fg = np.where(shifted == 1, 0.65, 0.35).astype(np.float32)
    fg[shifted == UNKNOWN] = 0.5
    nifti(tmp_path / "vol.nii.gz", np.stack([volume, 220.0 - volume], axis=-1))  # (X, Y, Z, 2)
    nifti(tmp_path / "p.nii.gz", np.stack([1 - fg, fg], axis=-1))  # (X, Y, Z, C)
    out = tmp_path / "out.nii.gz"
    assert run(tmp_path / "vol.nii.gz", "--probs", tmp_path / "p.nii.gz", "-o", out) == 0
    image = nib.load(out)
    assert image.shape == SHAPE and len(image.header.get_zooms()) == 3
    assert agreement(np.asanyarray(image.dataobj), truth) >= 0.99


def test_nifti_spacing_comes_from_the_header_and_spacing_overrides_it(tmp_path):
    nib = pytest.importorskip("nibabel")
    volume, labels = plate_scene()
    nifti(tmp_path / "vol.nii", volume, zooms=(10.0, 1.0, 1.0))
    nifti(tmp_path / "lab.nii", labels)
    assert read_volume(tmp_path / "vol.nii").spacing == (10.0, 1.0, 1.0)
    common = [tmp_path / "vol.nii", "--labels", tmp_path / "lab.nii", "--bilateral-weight", "0"]
    assert run(*common, "-o", tmp_path / "header.nii") == 0
    assert run(*common, "-o", tmp_path / "override.nii", "--spacing", "1", "1", "1") == 0
    np.testing.assert_array_equal(np.asanyarray(nib.load(tmp_path / "header.nii").dataobj), labels)
    assert np.asanyarray(nib.load(tmp_path / "override.nii").dataobj).sum() == 0
    # the header's spacing is the one given explicitly to a .npy of the same arrays
    np.save(tmp_path / "vol.npy", volume)
    np.save(tmp_path / "lab.npy", labels)
    assert (
        run(
            tmp_path / "vol.npy",
            "--labels",
            tmp_path / "lab.npy",
            "--bilateral-weight",
            "0",
            "--spacing",
            "10",
            "1",
            "1",
            "-o",
            tmp_path / "npy.npy",
        )
        == 0
    )
    np.testing.assert_array_equal(np.load(tmp_path / "npy.npy"), labels)


def test_spacing_overrides_an_unusable_header_spacing(tmp_path):
    nib = pytest.importorskip("nibabel")
    volume, labels = plate_scene()
    nifti(tmp_path / "vol.nii", volume)
    nifti(tmp_path / "lab.nii", labels)
    set_raw_pixdim(tmp_path / "vol.nii", 0, 0.0)  # refused on its own (see the bad-input cases)
    assert (
        run(
            tmp_path / "vol.nii",
            "--labels",
            tmp_path / "lab.nii",
            "--bilateral-weight",
            "0",
            "--spacing",
            "10",
            "1",
            "1",
            "-o",
            tmp_path / "out.nii",
        )
        == 0
    )
    np.testing.assert_array_equal(np.asanyarray(nib.load(tmp_path / "out.nii").dataobj), labels)


# --- bad input: one line, exit code 1, nothing written ----------------------------------------------------------------


def bad_inputs(tmp_path: Path) -> dict[str, tuple[list, str]]:
    volume, rough, _ = sphere_scene()
    probs = np.stack([1.0 - (rough == 1), (rough == 1) * 1.0]).astype(np.float32)
    files = {
        "vol.npy": volume,
        "lab.npy": rough,
        "small_lab.npy": rough[:, :, :15],
        "small_p.npy": probs[:, :, :, :15],
        "nan_vol.npy": np.where(rough == 1, np.nan, volume).astype(np.float32),
        "inf_vol.npy": np.where(rough == 1, np.inf, volume).astype(np.float32),
        "nan_p.npy": np.where(rough == 1, np.nan, probs).astype(np.float32),
        "float_lab.npy": rough.astype(np.float32),
        "complex_vol.npy": volume.astype(np.complex64),
        "sum_p.npy": probs * 0.5,
        "neg_p.npy": probs * 2 - 0.5,
        "int_p.npy": probs.astype(np.int64),
        "flat.npy": volume[0],
        "nine_lab.npy": np.full(SHAPE, 9, np.uint8),
    }
    for name, array in files.items():
        np.save(tmp_path / name, array)
    np.save(tmp_path / "object_vol.npy", np.array([[[{"a": 1}]]], dtype=object), allow_pickle=True)
    (tmp_path / "corrupt.npy").write_bytes(b"\x93NUMPY\x01\x00 this is not a header")
    (tmp_path / "png.npy").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    vol, lab = tmp_path / "vol.npy", tmp_path / "lab.npy"
    cases = {
        "labels shape": ([vol, "--labels", tmp_path / "small_lab.npy"], r"\(12, 16, 15\).*\(12, 16, 16\)"),
        "probs shape": ([vol, "--probs", tmp_path / "small_p.npy"], r"\(2, 12, 16, 15\).*\(12, 16, 16\)"),
        "nan volume": ([tmp_path / "nan_vol.npy", "--labels", lab], "nan_vol.npy.*NaN or Inf"),
        "inf volume": ([tmp_path / "inf_vol.npy", "--labels", lab], "inf_vol.npy.*NaN or Inf"),
        "nan probs": ([vol, "--probs", tmp_path / "nan_p.npy"], "nan_p.npy.*NaN or Inf"),
        "float labels": (
            [vol, "--labels", tmp_path / "float_lab.npy"],
            "float_lab.npy.*float32.*labels must be integers",
        ),
        "complex volume": ([tmp_path / "complex_vol.npy", "--labels", lab], "complex"),
        "object volume": ([tmp_path / "object_vol.npy", "--labels", lab], "dtype object"),
        "integer probs": ([vol, "--probs", tmp_path / "int_p.npy"], "int64.*must be floating point"),
        "probs sum": ([vol, "--probs", tmp_path / "sum_p.npy"], "sum_p.npy.*do not sum to 1.*--normalize"),
        "negative probs": ([vol, "--probs", tmp_path / "neg_p.npy"], "neg_p.npy.*negative"),
        "2-D npy": ([tmp_path / "flat.npy", "--labels", lab], r"2-D array.*\(16, 16\)"),
        "label range": ([vol, "--labels", tmp_path / "nine_lab.npy", "--num-classes", "4"], "label value 9"),
        "zero spacing": ([vol, "--labels", lab, "--spacing", "1", "0", "1"], "spacing must be .*> 0"),
        "negative spacing": ([vol, "--labels", lab, "--spacing", "1", "1", "-2"], "spacing must be .*> 0"),
        "corrupt npy": ([tmp_path / "corrupt.npy", "--labels", lab], "cannot read volume .*corrupt.npy"),
        "not npy": ([vol, "--labels", tmp_path / "png.npy"], "cannot read labels .*png.npy.*not a .npy"),
        "missing": ([tmp_path / "nope.npy", "--labels", lab], "volume not found"),
        "labels format": ([vol, "--labels", tmp_path / "lab.png"], "neither a .npy array nor a NIfTI"),
        "output format": ([vol, "--labels", lab, "-o", tmp_path / "out" / "o.nii"], "must end in .npy"),
        "overlay": ([vol, "--labels", lab, "--overlay"], "--overlay is for photos"),
    }
    return cases


NIFTI_CASES = [
    "2-D nifti",
    "zero header spacing",
    "negative header spacing",
    "corrupt nifti",
    "truncated nifti.gz",
    "nifti output format",
]


def bad_nifti_inputs(tmp_path: Path) -> dict[str, tuple[list, str]]:
    volume, rough, _ = sphere_scene()
    nifti(tmp_path / "flat.nii", volume[0])
    nifti(tmp_path / "vol.nii.gz", volume)
    nifti(tmp_path / "lab.nii.gz", rough)
    for name, zoom in (("zero.nii", 0.0), ("negative.nii.gz", -2.0)):
        nifti(tmp_path / name, volume)
        set_raw_pixdim(tmp_path / name, 1, zoom)
    (tmp_path / "corrupt.nii").write_bytes(b"garbage" * 100)
    whole = (tmp_path / "vol.nii.gz").read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])
    lab = tmp_path / "lab.nii.gz"
    return {
        "2-D nifti": ([tmp_path / "flat.nii", "--labels", lab], r"2-D NIfTI image \(shape \(16, 16\)\)"),
        "zero header spacing": (
            [tmp_path / "zero.nii", "--labels", lab],
            r"spacing \(1\.0, 0\.0, 1\.0\) in its header.*> 0.*--spacing",
        ),
        "negative header spacing": (
            [tmp_path / "negative.nii.gz", "--labels", lab],
            r"spacing \(1\.0, -2\.0, 1\.0\) in its header",
        ),
        "corrupt nifti": ([tmp_path / "corrupt.nii", "--labels", lab], "cannot read volume .*corrupt.nii"),
        "truncated nifti.gz": ([tmp_path / "truncated.nii.gz", "--labels", lab], "cannot read volume .*truncated"),
        "nifti output format": (
            [tmp_path / "vol.nii.gz", "--labels", lab, "-o", tmp_path / "out" / "o.npy"],
            "must end in .nii or .nii.gz",
        ),
    }


def one_line_error(capsys, command: str) -> str:
    """The error of a failed command: exactly one line on stderr, ``crfasrnn COMMAND: error: ...``, no traceback."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"crfasrnn {command}: error: "), lines[0]
    return lines[0]


def check_refused(tmp_path, capsys, args, match):
    """Exit code 1, one line matching ``match``, and no output (nor temporary file) under tmp_path/out."""
    if "-o" not in args:  # an output of the input's format
        args = [*args, "-o", tmp_path / "out" / ("o.nii.gz" if ".nii" in str(args[0]) else "o.npy")]
    assert run(*args) == 1
    error = one_line_error(capsys, "refine")
    assert re.search(match, error), error
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("**/.*.tmp"))


BAD_CASES = [
    "labels shape",
    "probs shape",
    "nan volume",
    "inf volume",
    "nan probs",
    "float labels",
    "complex volume",
    "object volume",
    "integer probs",
    "probs sum",
    "negative probs",
    "2-D npy",
    "label range",
    "zero spacing",
    "negative spacing",
    "corrupt npy",
    "not npy",
    "missing",
    "labels format",
    "output format",
    "overlay",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_volumes_get_one_line_and_write_nothing(tmp_path, capsys, case):
    args, match = bad_inputs(tmp_path)[case]
    check_refused(tmp_path, capsys, args, match)


@pytest.mark.parametrize("case", NIFTI_CASES)
def test_bad_nifti_gets_one_line_and_writes_nothing(tmp_path, capsys, case):
    args, match = bad_nifti_inputs(tmp_path)[case]
    check_refused(tmp_path, capsys, args, match)


def test_nifti_without_nibabel_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    _, rough, _ = sphere_scene()
    (tmp_path / "vol.nii.gz").write_bytes(b"not read: nibabel is missing")
    np.save(tmp_path / "lab.npy", rough)
    monkeypatch.setitem(sys.modules, "nibabel", None)  # `import nibabel` now raises ImportError
    check_refused(
        tmp_path,
        capsys,
        [tmp_path / "vol.nii.gz", "--labels", tmp_path / "lab.npy", "-o", tmp_path / "out" / "o.nii.gz"],
        r"needs nibabel: pip install 'crfasrnn\[nifti\]'",
    )


def test_spacing_is_refused_for_photos(tmp_path, capsys):
    photo, labels = tmp_path / "photo.png", tmp_path / "labels.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photo)
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(labels)
    check_refused(
        tmp_path,
        capsys,
        [photo, "--labels", labels, "--spacing", "1", "1", "1", "-o", tmp_path / "out" / "o.png"],
        "--spacing is for volumes",
    )
