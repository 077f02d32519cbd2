"""Helpers of the web-app tests (their fixtures are in serve/conftest.py): synthetic photos and label maps as upload
bytes, a tiny segmentation network, and a real uvicorn server on a free port in a background thread.

This module imports neither FastAPI nor uvicorn at import time, so that the serve tests can skip without them."""

from __future__ import annotations

import io
import socket
import threading
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from crfasrnn.models import CrfRnnNet

if TYPE_CHECKING:
    from typing_extensions import Self


def png_bytes(array: np.ndarray, *, palette: bool = False, fmt: str = "PNG") -> bytes:
    """Encode an array as image bytes (uint16 gives a 16-bit PNG; a palette PNG with the VOC colours when
    ``palette``)."""
    if array.dtype == np.int64:
        array = array.astype(np.uint8)
    im = Image.fromarray(array)
    if palette:
        from crfasrnn.image import voc_palette

        im = Image.fromarray(array.astype(np.uint8), mode="P")
        im.putpalette(voc_palette().reshape(-1).tolist())
    buffer = io.BytesIO()
    im.save(buffer, format=fmt)
    return buffer.getvalue()


def decode_png(b64: str) -> Image.Image:
    import base64

    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def two_region_photo(height: int = 48, width: int = 64, *, split: int = 32, vertical: bool = True, seed: int = 0):
    """A photo of two flat colour regions with mild noise, split at column (or row) ``split``; and its truth."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((height, width), np.int64)
    if vertical:
        truth[:, split:] = 1
    else:
        truth[split:, :] = 1
    colours = np.array([[40, 60, 200], [220, 180, 40]], np.float64)
    photo = colours[truth] + rng.normal(0, 6, size=(height, width, 3))
    return photo.clip(0, 255).astype(np.uint8), truth


def coarse_of(truth: np.ndarray, *, shift: int = 5, band: int = 3, vertical: bool = True) -> np.ndarray:
    """A coarse annotation: the boundary moved by ``shift`` pixels, with an unknown (255) band around it."""
    coarse = np.roll(truth, shift, axis=1 if vertical else 0)
    edge = np.flatnonzero(np.diff(coarse[0] if vertical else coarse[:, 0]))[0] + 1
    if vertical:
        coarse[:, edge - band : edge + band] = 255
    else:
        coarse[edge - band : edge + band, :] = 255
    return coarse


def tiny_network(num_classes: int = 21, *, seed: int = 0) -> CrfRnnNet:
    """A CrfRnnNet with 1/16 of the channels and random (not zero) heads, so its labels vary over a photo."""
    torch.manual_seed(seed)
    net = CrfRnnNet(num_classes, num_iterations=3, width=1 / 16)
    with torch.no_grad():
        for name, p in net.backbone.named_parameters():
            if name.startswith("score"):  # the heads start at zero (all background); random weights, zero biases
                p.normal_(0, 0.5) if p.ndim == 4 else p.zero_()
    return net.eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving an app on 127.0.0.1 in a daemon thread (started and stopped by the fixture)."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
