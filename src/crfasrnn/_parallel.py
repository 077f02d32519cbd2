"""How the compiled CPU kernels (numba) use threads: a fork-safe threading layer, torch's thread count, no spinning.

numba picks its threading layer the first time a parallel kernel runs. Its usual choice on Linux, GNU OpenMP, has two
faults for a layer that lives inside training loops:

* it is not fork-safe: a forked child (a DataLoader worker, a multiprocessing pool) that runs a kernel after its parent
  did is killed ("fork() called from a process already using GNU OpenMP");
* its idle threads spin, so with one of two cores busy elsewhere (data-loader workers) a two-thread forward took about
  1.5x the one-thread forward.

This module asks numba for a *fork-safe* layer (``NUMBA_THREADING_LAYER=forksafe``: Intel TBB where the ``tbb`` wheel
is installed, else numba's own ``workqueue``), unless the user chose a layer in the environment. TBB's idle threads
sleep and it is thread-safe. ``workqueue`` is not thread-safe (two threads launching kernels at once abort the
process), so where it is in use every kernel launch goes through one lock.

Every kernel call runs inside :func:`parallel`, which sets numba's thread count to ``torch.get_num_threads()`` (at most
numba's pool size), so ``torch.set_num_threads`` governs this package's kernels too.

And in a forked child, torch's own OpenMP pool is unusable (torch operations that run in parallel hang there), so the
child's torch thread count is set to 1, as DataLoader workers do themselves.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.metadata
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import numba
import torch

__all__ = ["parallel", "parallel_kernel", "threading_layer"]

logger = logging.getLogger(__name__)

_LOCK = threading.RLock()
_F = TypeVar("_F", bound=Callable)


def _preload_tbb() -> bool:
    """Load the ``tbb`` wheel's library so that numba's TBB layer finds it (pip puts it outside the loader's path)."""
    try:
        files = importlib.metadata.files("tbb") or []
    except importlib.metadata.PackageNotFoundError:
        return False
    names = ("libtbb.so.12",) if sys.platform.startswith("linux") else ("tbb12.dll", "libtbb.12.dylib")
    for file in files:
        if file.name in names:
            try:
                ctypes.CDLL(str(file.locate()), mode=getattr(ctypes, "RTLD_GLOBAL", 0))
                return True
            except OSError as error:  # pragma: no cover - a broken installation
                logger.debug("could not load %s: %s", file, error)
    return False


def _configure() -> None:
    _preload_tbb()  # also where the user asks for TBB themselves
    if "NUMBA_THREADING_LAYER" not in os.environ:  # the user's explicit choice wins
        # TBB if it loads, else workqueue (never GNU OpenMP); numba.config sets its options through globals(), so
        # its annotations do not declare them
        numba.config.THREADING_LAYER = "forksafe"  # type: ignore[attr-defined]


def _after_fork_in_child() -> None:
    with contextlib.suppress(RuntimeError):  # torch refuses while a parallel region is active
        torch.set_num_threads(1)


_configure()
if hasattr(os, "register_at_fork") and "OpenMP" in torch.__config__.parallel_info():
    os.register_at_fork(after_in_child=_after_fork_in_child)


def threading_layer() -> str | None:
    """The threading layer numba uses (``"tbb"``, ``"workqueue"``, ...), or None before any kernel ran."""
    try:
        return numba.threading_layer()
    except ValueError:
        return None


@contextlib.contextmanager
def parallel() -> Iterator[None]:
    """Run numba kernels with ``torch.get_num_threads()`` threads; serialised where the layer is not thread-safe."""
    # numba.config sets its options through globals(), so its annotations do not declare them
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
    previous = numba.get_num_threads()  # the first call starts numba's threads, which fixes the layer
    lock = _LOCK if threading_layer() not in ("tbb", "omp") else contextlib.nullcontext()
    with lock:
        if previous != threads:
            numba.set_num_threads(threads)
        try:
            yield
        finally:
            if previous != threads:
                numba.set_num_threads(previous)


def parallel_kernel(function: _F) -> _F:
    """Decorator: the function's kernel launches run inside :func:`parallel`."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with parallel():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
