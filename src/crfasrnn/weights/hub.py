"""The published weights by name or URL: downloaded once into a cache, verified, then used offline.

A weights argument is a local path (used as it is), an ``http(s)://`` URL, or a registered name (:data:`REGISTRY`):

* ``voc-coco`` (:data:`DEFAULT_WEIGHTS`): the PyTorch port's ``crfasrnn_weights.pth`` (release 0.0.1 of
  sadeepj/crfasrnn_pytorch);
* ``voc-coco-caffe``: the original ``TVG_CRFRNN_COCO_VOC.caffemodel`` (torrvision/crfasrnn), whose model card gives
  its size and sha1. The original's only link is a URL shortener; where it no longer answers, any mirror of the file
  can be named with ``crfasrnn weights download voc-coco-caffe --url MIRROR``, and is checked against the sha1;
* ``voc-coco-keras``: the Keras port's ``crfrnn_keras_model.h5`` (release v1.0 of sadeepj/crfasrnn_keras).

Downloads go to ``$TORCH_HOME/hub/checkpoints`` (torch.hub's cache, :func:`cache_dir`) under a temporary name, with a
progress bar, and are verified before they are renamed into place: against the published sha1 where there is one,
else by reading them as weights (the loader's structural validation); the sha256 of a file without a published sha1
is recorded beside it (``<file>.sha256``) and checked at every later use. An interrupted, truncated or refused
download leaves nothing usable behind. ``CRFASRNN_WEIGHTS_BASE_URL`` replaces the registered hosts (every name is then
fetched from ``<base>/<file name>``): for a mirror, and for tests, which serve files on loopback.

The published model is for non-commercial use only (its model card: "for commercial use, please contact
crfasrnn@gmail.com"); the first download says so once.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..files import atomic_write
from .errors import WeightsError
from .format import file_digest

__all__ = [
    "BASE_URL_ENV",
    "DEFAULT_WEIGHTS",
    "LICENCE",
    "REGISTRY",
    "WEIGHTS_ENV",
    "DownloadError",
    "PublishedWeights",
    "cache_dir",
    "cached_path",
    "download",
    "is_url",
    "resolve",
    "url_of",
    "verify",
]

logger = logging.getLogger(__name__)

#: The environment variable naming the weights a command uses when ``--weights`` is not given.
WEIGHTS_ENV = "CRFASRNN_WEIGHTS"
#: The environment variable that replaces the registered hosts: names are fetched from ``<base>/<file name>``.
BASE_URL_ENV = "CRFASRNN_WEIGHTS_BASE_URL"
#: The weights used where none are named.
DEFAULT_WEIGHTS = "voc-coco"
#: The licence of the published model, as its model card states it.
LICENCE = "non-commercial use only (for commercial use, contact crfasrnn@gmail.com), as the model card states"

_CHUNK = 1 << 20


@dataclass(frozen=True)
class PublishedWeights:
    """A published weights file: where it is, how to check it, what it is."""

    name: str
    url: str
    filename: str
    description: str
    sha1: str | None = None
    size: int | None = None


#: The registered names of the published weights.
REGISTRY: dict[str, PublishedWeights] = {
    weights.name: weights
    for weights in (
        PublishedWeights(
            "voc-coco",
            "https://github.com/sadeepj/crfasrnn_pytorch/releases/download/0.0.1/crfasrnn_weights.pth",
            "crfasrnn_weights.pth",
            "CRF-RNN (FCN-8s + CRF) trained on COCO and PASCAL VOC, the PyTorch port's file",
        ),
        PublishedWeights(
            "voc-coco-caffe",
            "http://goo.gl/j7PrPZ",  # the original's download script; the shortener may no longer answer
            "TVG_CRFRNN_COCO_VOC.caffemodel",
            "the same model, the original Caffe file (V1 layers)",
            sha1="bfda5c5149d566aa56695789fa9a08e7a7f3070a",
            size=537_968_303,
        ),
        PublishedWeights(
            "voc-coco-keras",
            "https://github.com/sadeepj/crfasrnn_keras/releases/download/v1.0/crfrnn_keras_model.h5",
            "crfrnn_keras_model.h5",
            "the same model, the Keras port's file",
        ),
    )
}


class DownloadError(WeightsError):
    """A download that failed or gave a file that is not the one published (a ``ValueError``: one line in the CLI)."""


def cache_dir() -> Path:
    """Where downloaded weights are kept: torch.hub's ``<hub dir>/checkpoints`` (``$TORCH_HOME/hub/checkpoints``)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def is_url(spec: str | os.PathLike) -> bool:
    """Whether a weights argument is an ``http(s)://`` URL.

    Example:
        >>> is_url("https://example.org/w.pth"), is_url("w.pth")
        (True, False)
    """
    return isinstance(spec, str) and spec.lower().startswith(("http://", "https://"))


def url_of(name: str) -> str:
    """The URL a registered name is fetched from: the registered one, or ``<$CRFASRNN_WEIGHTS_BASE_URL>/<file>``."""
    weights = _registered(name)
    base = os.environ.get(BASE_URL_ENV, "").strip()
    return f"{base.rstrip('/')}/{weights.filename}" if base else weights.url


def cached_path(spec: str) -> Path:
    """Where the file of a registered name or of a URL is (or would be) kept in the cache."""
    if spec in REGISTRY:
        return cache_dir() / REGISTRY[spec].filename
    name = Path(urllib.parse.urlparse(spec).path).name
    if not name:
        raise DownloadError(f"cannot name a cache file after the URL {spec}: it has no file name")
    return cache_dir() / name


def resolve(
    spec: str | os.PathLike,
    *,
    url: str | None = None,
    timeout: float = 60.0,
    progress: bool = True,
    validate: Callable[[Path], object] | None = None,
) -> Path:
    """The local file a weights argument stands for, downloading it into the cache first where needed.

    Args:
        spec: a local path, an ``http(s)://`` URL or a registered name (:data:`REGISTRY`).
        url: for a registered name, fetch from this URL (a mirror) instead; the file is still checked against the
            registered sha1.
        timeout: seconds a connection may stay silent before the download is abandoned.
        progress: show a progress bar while downloading.
        validate: a check of a downloaded file without a published sha1 (by default none: the caller's loader
            validates it); it raises to refuse the file, which is then not kept.

    Raises:
        FileNotFoundError: a path that does not exist (and is neither a URL nor a registered name).
        DownloadError: the download failed, or the file is not the published one.
    """
    text = os.fspath(spec)
    if not is_url(text) and text not in REGISTRY:
        path = Path(text)
        if not path.exists():
            names = ", ".join(REGISTRY)
            raise FileNotFoundError(f"weights file not found: {text} (not a URL, and not a registered name: {names})")
        return path
    published = REGISTRY.get(text)
    target = cached_path(text)
    if target.is_file():
        _check_cached(target, published)
        return target
    source = url or (url_of(text) if published is not None else text)
    logger.info("downloading %s to %s", source, target)
    path = download(
        source,
        target,
        sha1=None if published is None else published.sha1,
        timeout=timeout,
        progress=progress,
        validate=validate,
    )
    if published is not None:
        _note_licence(path.parent)
    return path


def download(
    url: str,
    target: str | os.PathLike,
    *,
    sha1: str | None = None,
    timeout: float = 60.0,
    progress: bool = True,
    validate: Callable[[Path], object] | None = None,
) -> Path:
    """Download ``url`` to ``target`` through a temporary file beside it, verified before it is renamed.

    The check is the sha1 where one is given, else ``validate`` (if any); then the file's sha256 is recorded beside
    it (``<target>.sha256``). Nothing is left at ``target`` unless every check passed.

    Raises:
        DownloadError: unreachable, refused (an HTTP error, an HTML page), stalled, truncated, or the wrong file.
    """
    target = Path(target)
    how = f"pass a local file instead (--weights PATH), or put the file at {target}"
    digests: dict[str, str] = {}

    def fetch(tmp: str) -> None:
        digests.update(_fetch(url, Path(tmp), timeout=timeout, progress=progress, name=target.name, how=how))
        if sha1 is not None and digests["sha1"] != sha1.lower():
            raise DownloadError(
                f"{url} gave a file whose sha1 is {digests['sha1']}, not the published {sha1}: it is not the "
                f"published file (a changed or damaged mirror?); nothing was kept: {how}"
            )
        if sha1 is None and validate is not None:
            try:
                validate(Path(tmp))
            except (WeightsError, OSError, ValueError) as exc:
                reason = str(exc).replace(tmp, target.name)
                raise DownloadError(f"{url} did not give a weights file ({reason}); nothing was kept: {how}") from None

    try:
        atomic_write(target, fetch)
    except DownloadError:
        raise
    except OSError as exc:
        raise DownloadError(f"could not write {target}: {exc}") from None
    _record_sha256(target, digests["sha256"])
    logger.info("downloaded %s to %s (sha256 %s)", url, target, digests["sha256"])
    return target


def _note_licence(folder: Path) -> None:
    """Say once per cache (a marker file remembers it) what the published weights may be used for."""
    marker = folder / ".crfasrnn-licence-noted"
    if not marker.exists():
        logger.warning("the published CRF-RNN weights are for %s", LICENCE)
        marker.write_text(LICENCE + "\n")


def verify(spec: str | os.PathLike) -> Path:
    """Check a weights file without downloading anything; returns its path.

    A registered name or a URL stands for its cached file, which must exist; it is checked against the published
    sha1 (and size) where there is one, and against the sha256 recorded at download. A local path is returned as it
    is (the caller reads it as weights: the structural check).

    Raises:
        FileNotFoundError: a file that does not exist, or a name or URL not downloaded yet.
        DownloadError: a cached file that is not the published one or changed since it was downloaded.
    """
    text = os.fspath(spec)
    if not is_url(text) and text not in REGISTRY:
        if not Path(text).is_file():
            raise FileNotFoundError(f"weights file not found: {text}")
        return Path(text)
    path = cached_path(text)
    if not path.is_file():
        raise FileNotFoundError(f"{text} is not downloaded ({path} does not exist): crfasrnn weights download {text}")
    published = REGISTRY.get(text)
    _check_cached(path, published)
    if published is not None and published.sha1 is not None:
        actual = file_digest(path, "sha1")
        if actual != published.sha1:
            raise DownloadError(
                f"{path} has sha1 {actual}, not the published {published.sha1}: delete it to download it again"
            )
    return path


def _registered(name: str) -> PublishedWeights:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"no published weights are called {name!r}; registered: {', '.join(REGISTRY)}") from None


def _fetch(url: str, path: Path, *, timeout: float, progress: bool, name: str, how: str) -> dict[str, str]:
    """Stream ``url`` into ``path``; returns the sha1 and sha256 of what was written. ``how`` ends every error."""
    from tqdm import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "crfasrnn"})
    sha1, sha256 = hashlib.sha1(), hashlib.sha256()
    received = 0
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(path, "wb") as out:
            if "text/html" in response.headers.get("Content-Type", ""):
                raise DownloadError(f"{url} answered with a web page, not a weights file: {how}")
            length = response.headers.get("Content-Length")
            expected = int(length) if length is not None and length.isdigit() else None
            with tqdm(total=expected, unit="B", unit_scale=True, desc=name, disable=not progress) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    sha1.update(chunk)
                    sha256.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"{url} answered HTTP {exc.code} {exc.reason}: {how}") from None
    except TimeoutError:
        raise DownloadError(f"{url} sent nothing for {timeout:g} s (stalled or offline): {how}") from None
    except urllib.error.URLError as exc:
        raise DownloadError(f"cannot reach {url} ({exc.reason}): offline? {how}") from None
    except (ConnectionError, http.client.HTTPException) as exc:  # a connection or a response cut short
        raise DownloadError(f"the download of {url} broke off after {received:,} bytes ({exc}): {how}") from None
    if expected is not None and received != expected:
        raise DownloadError(f"the download of {url} stopped at {received:,} of {expected:,} bytes: {how}")
    if received == 0:
        raise DownloadError(f"{url} gave an empty file: {how}")
    return {"sha1": sha1.hexdigest(), "sha256": sha256.hexdigest()}


def _sha256_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _record_sha256(path: Path, digest: str) -> None:
    record = _sha256_file(path)
    atomic_write(record, lambda tmp: Path(tmp).write_text(f"{digest}  {path.name}\n"))


def _check_cached(path: Path, published: PublishedWeights | None) -> None:
    """A cached file must still be what was downloaded: its recorded sha256 (and size, where published)."""
    if published is not None and published.size is not None and path.stat().st_size != published.size:
        raise DownloadError(
            f"the cached {path} has {path.stat().st_size:,} bytes, not the published {published.size:,}: delete it "
            "to download it again"
        )
    record = _sha256_file(path)
    if not record.is_file():
        return  # put there by hand: the loader validates it
    fields = record.read_text().split()
    recorded = fields[0] if fields else ""
    actual = file_digest(path, "sha256")
    if actual != recorded:
        raise DownloadError(
            f"the cached {path} changed since it was downloaded (sha256 {actual}, recorded {recorded}): delete it "
            "to download it again"
        )
