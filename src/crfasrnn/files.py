"""Writing output files safely: one atomic writer for every file the package writes, and the checks of a target.

:func:`atomic_write` writes to a temporary name in the target's folder, flushes and fsyncs it, gives it the usual
permissions, renames it over the target and fsyncs the folder: a crash, a kill or a full disk at any moment leaves
either the old file or the new one, never a part. Temporary files of earlier writes that were killed half-way
(``.<name>.*.tmp``) are removed after a successful write.

:func:`check_output` is what every command asks of a target before it computes anything: an existing target must be a
regular file (a symlink, a FIFO, a device such as ``/dev/full`` or a folder is refused rather than replaced), it must
not be one of the command's inputs, and its extension must name the format that will be written.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["OutputError", "atomic_write", "check_output", "remove_orphans"]


class OutputError(ValueError):
    """A target that cannot or must not be written (a ValueError: the CLI reports it in one line)."""


_KINDS = [
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
]


def check_output(
    path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (), suffixes: Iterable[str] | None = None
) -> Path:
    """Validate an output path before any work: returns it as a Path.

    Raises:
        OutputError: the target exists and is not a regular file, is one of ``inputs``, or its extension is not one of
            ``suffixes`` (compared case-insensitively).
    """
    path = Path(path)
    if suffixes is not None:
        allowed = tuple(s.lower() for s in suffixes)
        if path.suffix.lower() not in allowed:
            raise OutputError(f"output {path} must end in {' or '.join(allowed)}: that is the format written")
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return path
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror}") from None
    for test, kind in _KINDS:
        if test(info.st_mode):
            raise OutputError(f"output {path} is {kind}, not a regular file: refusing to replace it")
    for source in inputs:
        try:
            if os.path.samefile(path, source):
                raise OutputError(f"output {path} is also an input ({source}): refusing to overwrite it")
        except FileNotFoundError:
            continue
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def remove_orphans(path: str | os.PathLike) -> int:
    """Remove the temporary files (``.<name>.*.tmp``) that killed writes of ``path`` left beside it.

    Returns:
        How many were removed.
    """
    path = Path(path)
    removed = 0
    for orphan in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            orphan.unlink()
            removed += 1
        except OSError:  # another writer's file in use, or already gone
            pass
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Write a file atomically: ``write(temporary_path)`` creates the content, which then replaces ``path``.

    The target is checked first (:func:`check_output`: an existing target must be a regular file). A full disk is
    reported as ``OSError`` "no space left on device" naming ``path`` (and the temporary file is removed).
    """
    path = check_output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        try:
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except Exception as error:
            if _is_no_space(error):
                raise OSError(errno.ENOSPC, f"no space left on device writing {path}") from error
            raise
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    remove_orphans(path)


def _is_no_space(error: BaseException) -> bool:
    """Whether an error (an OSError, or a library's own error wrapping one) comes from a full disk."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(current).lower()
        if "no space left" in text or "unexpected pos" in text or "disk quota" in text:
            return True
        current = current.__cause__ or current.__context__
    return False
