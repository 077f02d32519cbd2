"""crfasrnn.files: one atomic writer, targets checked before any work (no clobbered devices, links, FIFOs or inputs)."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crfasrnn.checkpoint import save_checkpoint
from crfasrnn.files import OutputError, atomic_write, check_output, remove_orphans
from crfasrnn.image import save_label_map

DATA = Path(__file__).resolve().parents[1] / "src" / "crfasrnn" / "data"


def _write_text(text):
    def write(tmp):
        Path(tmp).write_text(text)

    return write


def test_atomic_write_replaces_a_regular_file_and_keeps_the_usual_permissions(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    atomic_write(target, _write_text("new"))
    assert target.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temporary file left


@pytest.mark.parametrize("kind", ["symlink", "fifo", "folder"])
def test_non_regular_targets_are_refused_and_left_alone(tmp_path, kind):
    target = tmp_path / "target"
    real = tmp_path / "real.txt"
    real.write_text("keep")
    if kind == "symlink":
        target.symlink_to(real)
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    with pytest.raises(OutputError, match="not a regular file"):
        atomic_write(target, _write_text("x"))
    assert real.read_text() == "keep"
    assert {"symlink": target.is_symlink(), "fifo": stat.S_ISFIFO(os.lstat(target).st_mode), "folder": target.is_dir()}[
        kind
    ]


def test_a_device_is_refused():
    with pytest.raises(OutputError, match="character device"):
        check_output("/dev/null")  # only looked at: check_output never writes


def test_an_input_is_not_an_output(tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"x")
    with pytest.raises(OutputError, match="also an input"):
        check_output(tmp_path / "." / "photo.png", inputs=[photo])
    check_output(tmp_path / "other.png", inputs=[photo])


def test_the_extension_names_the_format(tmp_path):
    with pytest.raises(OutputError, match=r"must end in \.png"):
        save_label_map(np.zeros((4, 4), dtype=np.uint8), tmp_path / "labels.jpg")
    assert not (tmp_path / "labels.jpg").exists()
    save_label_map(np.zeros((4, 4), dtype=np.uint8), tmp_path / "labels.PNG")


def test_a_full_disk_names_the_file_and_leaves_no_temporary(tmp_path):
    def full(tmp):
        Path(tmp).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=r"no space left on device writing .*ckpt\.pt"):
        atomic_write(tmp_path / "ckpt.pt", full)
    assert list(tmp_path.iterdir()) == []


def test_orphaned_temporaries_are_removed_after_a_successful_write(tmp_path):
    target = tmp_path / "last.pt"
    for k in range(3):  # what writes killed half-way leave behind
        (tmp_path / f".last.pt.{k}abc.tmp").write_bytes(b"partial")
    (tmp_path / ".other.pt.1.tmp").write_bytes(b"someone else's")
    save_checkpoint({"step": 1}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.1.tmp", "last.pt"]
    assert remove_orphans(target) == 0


def _refine_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "crfasrnn", "refine", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        check=False,
    )


def test_refine_refuses_to_overwrite_its_input_a_fifo_or_a_wrong_extension(tmp_path):
    photo, labels = tmp_path / "photo.png", tmp_path / "coarse.png"
    from PIL import Image

    Image.open(DATA / "astronaut.jpg").convert("RGB").resize((40, 30)).save(photo)
    Image.open(DATA / "astronaut_coarse.png").resize((40, 30), Image.NEAREST).save(labels)
    before = photo.read_bytes(), labels.read_bytes()
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for output, message in [
        (photo, "also an input"),
        (labels, "also an input"),
        (fifo, "a FIFO"),
        (tmp_path / "out.jpg", r"must end in \.png"),
    ]:
        proc = _refine_cli(photo, "--labels", labels, "-o", output, cwd=tmp_path)
        assert proc.returncode == 1, proc.stderr
        assert message.replace("\\", "") in proc.stderr and "Traceback" not in proc.stderr
    assert (photo.read_bytes(), labels.read_bytes()) == before
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and not (tmp_path / "out.jpg").exists()


def test_segment_with_unreadable_weights_creates_no_output_folder(tmp_path):
    bad = tmp_path / "bad.caffemodel"
    bad.write_bytes(b"not a protobuf")
    shutil.copy(DATA / "astronaut.jpg", tmp_path / "photo.jpg")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "crfasrnn",
            "segment",
            str(tmp_path / "photo.jpg"),
            "--weights",
            str(bad),
            "-o",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True, check=False
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_convert_to_a_full_disk_says_so_in_one_line(tmp_path, tiny_disk):
    from synthetic_weights import random_state_dict, write_port_pth

    source = write_port_pth(tmp_path / "port.pth", random_state_dict(21, width=1 / 16, seed=0))
    for destination in (tiny_disk / "w.safetensors", tiny_disk / "w.pt"):
        proc = subprocess.run(
            [sys.executable, "-m", "crfasrnn", "convert", str(source), str(destination)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert proc.returncode == 1, proc.stderr
        assert "no space left on device writing" in proc.stderr and str(destination) in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert list(tiny_disk.iterdir()) == []  # no partial file, no temporary


def test_a_checkpoint_to_a_full_disk_names_the_file(tiny_disk):
    import torch

    with pytest.raises(OSError, match=r"no space left on device writing .*last\.pt"):
        save_checkpoint({"model": {"w": torch.zeros(200_000)}}, tiny_disk / "last.pt")
    assert list(tiny_disk.iterdir()) == []
