"""Published weights by name or URL: downloads from a loopback HTTP server into the cache, verified, then offline.

Every test serves synthetic weight files from ``http.server`` on 127.0.0.1 (port 0) and points the published names
at it with ``CRFASRNN_WEIGHTS_BASE_URL``; ``TORCH_HOME`` is a fresh folder per test (``conftest.py``), so nothing
touches the internet or the user's cache.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic_weights import random_state_dict, write_caffemodel, write_port_pth

from crfasrnn.cli import main
from crfasrnn.weights import load_model
from crfasrnn.weights.hub import REGISTRY, DownloadError, cache_dir, resolve, verify


@dataclass
class Route:
    body: bytes
    status: int = 200
    content_type: str = "application/octet-stream"
    behaviour: str = "normal"  # "normal", "truncate" (announce twice the length), "stall" (stop after 16 bytes)


@dataclass
class Server:
    url: str
    routes: dict[str, Route] = field(default_factory=dict)
    hits: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    close: Callable[[], None] = lambda: None


@pytest.fixture
def server(monkeypatch) -> Iterator[Server]:
    """A loopback HTTP server of synthetic files; the published names resolve to it."""
    state = Server(url="")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.hits.append(self.path)
            route = state.routes.get(self.path)
            if route is None:
                self.send_error(404, "Not Found")
                return
            self.send_response(route.status)
            self.send_header("Content-Type", route.content_type)
            length = len(route.body) * (2 if route.behaviour == "truncate" else 1)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            if route.behaviour == "stall":
                self.wfile.write(route.body[:16])
                self.wfile.flush()
                state.stop.wait(10)  # silent until the test ends: the client must give up by itself
                return
            self.wfile.write(route.body)
            self.close_connection = True

        def log_message(self, *args) -> None:  # quiet
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setenv("CRFASRNN_WEIGHTS_BASE_URL", state.url + "/published")
    closed = threading.Event()

    def close() -> None:  # stop serving and free the port: every later request is refused
        if not closed.is_set():
            closed.set()
            state.stop.set()
            httpd.shutdown()
            httpd.server_close()

    state.close = close
    try:
        yield state
    finally:
        close()


@pytest.fixture(scope="module")
def port_pth(tmp_path_factory) -> bytes:
    """The bytes of a small synthetic ``crfasrnn_weights.pth`` (the port's layout)."""
    path = write_port_pth(tmp_path_factory.mktemp("weights") / "w.pth", random_state_dict(21, width=1 / 16))
    return path.read_bytes()


def _cache_files() -> list[str]:
    folder = cache_dir()
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _photo(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "a.jpg"
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    return path


def test_the_default_name_downloads_once_then_works_offline(server, port_pth, tmp_path, capsys, caplog):
    server.routes["/published/crfasrnn_weights.pth"] = Route(port_pth)
    photo = _photo(tmp_path)
    with caplog.at_level("WARNING"):
        assert main(["segment", str(photo), "-o", str(tmp_path / "first"), "--iterations", "1"]) == 0
    assert (tmp_path / "first" / "a.png").is_file()
    assert server.hits == ["/published/crfasrnn_weights.pth"]
    cached = cache_dir() / "crfasrnn_weights.pth"
    assert cached.read_bytes() == port_pth
    recorded = (cache_dir() / "crfasrnn_weights.pth.sha256").read_text().split()[0]
    assert recorded == hashlib.sha256(port_pth).hexdigest()
    assert sum("non-commercial" in r.getMessage() for r in caplog.records) == 1  # the licence, said once

    server.close()  # no server any more: the cache must serve
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main(["segment", str(photo), "-o", str(tmp_path / "second"), "--iterations", "1"]) == 0
    assert server.hits == ["/published/crfasrnn_weights.pth"]  # no second request
    assert not any("non-commercial" in r.getMessage() for r in caplog.records)
    first = np.asarray(Image.open(tmp_path / "first" / "a.png"))
    assert np.array_equal(first, np.asarray(Image.open(tmp_path / "second" / "a.png")))
    capsys.readouterr()


def test_a_url_is_downloaded_into_the_cache_under_its_file_name(server, port_pth):
    server.routes["/any/where/mine.pth"] = Route(port_pth)
    model, info = load_model(f"{server.url}/any/where/mine.pth", num_iterations=1)
    assert info.format == "port-pth" and model.num_classes == 21
    assert (cache_dir() / "mine.pth").read_bytes() == port_pth
    model_again, _ = load_model(f"{server.url}/any/where/mine.pth", num_iterations=1)  # from the cache
    assert len(server.hits) == 1
    for a, b in zip(model.state_dict().values(), model_again.state_dict().values()):
        assert bool((a == b).all())


@pytest.mark.parametrize(
    ("route", "message"),
    [
        (Route(b"", behaviour="truncate"), "empty file"),
        (Route(b"x" * 5000, behaviour="truncate"), "stopped at 5,000 of 10,000 bytes"),
        (Route(b"<html><body>Rate limited</body></html>", content_type="text/html"), "web page"),
        (Route(b"nothing", status=503), "HTTP 503"),
        (Route(b"not a weights file at all, but bytes"), "did not give a weights file"),
    ],
    ids=["empty", "truncated", "html", "http-error", "garbage"],
)
def test_a_bad_download_is_one_clear_error_and_leaves_nothing(server, tmp_path, capsys, route, message):
    server.routes["/published/crfasrnn_weights.pth"] = route
    rc = main(["segment", str(_photo(tmp_path)), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.splitlines()[-1]  # (before it, the progress bar)
    assert rc == 1 and err.startswith("crfasrnn segment: error: "), err
    assert message in err and "--weights PATH" in err, err
    assert _cache_files() == []  # no partial file, no temporary, no checksum record
    assert not (tmp_path / "out").exists()


def test_a_missing_file_names_the_url_and_the_cache(server, tmp_path, capsys):
    rc = main(["segment", str(_photo(tmp_path)), "-w", "voc-coco", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"{server.url}/published/crfasrnn_weights.pth answered HTTP 404" in err
    assert str(cache_dir() / "crfasrnn_weights.pth") in err
    assert _cache_files() == []


def test_a_stalled_server_is_abandoned_within_the_timeout(server, port_pth):
    server.routes["/published/crfasrnn_weights.pth"] = Route(port_pth, behaviour="stall")
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"sent nothing for 0\.5 s"):
        resolve("voc-coco", timeout=0.5, progress=False)
    assert time.monotonic() - start < 5
    assert _cache_files() == []


def test_the_published_sha1_refuses_another_file(server, tmp_path, capsys):
    """voc-coco-caffe has a published sha1: a file that reads as a caffemodel but is not the published one is refused,
    from the registered host and from a mirror alike."""
    caffemodel = write_caffemodel(tmp_path / "c.caffemodel", random_state_dict(21, width=1 / 16)).read_bytes()
    server.routes["/published/TVG_CRFRNN_COCO_VOC.caffemodel"] = Route(caffemodel)
    server.routes["/mirror/TVG_CRFRNN_COCO_VOC.caffemodel"] = Route(caffemodel)
    published = REGISTRY["voc-coco-caffe"].sha1
    with pytest.raises(DownloadError, match=f"not the published {published}"):
        resolve("voc-coco-caffe", progress=False)
    assert _cache_files() == []
    rc = main(["weights", "download", "voc-coco-caffe", "--url", f"{server.url}/mirror/TVG_CRFRNN_COCO_VOC.caffemodel"])
    assert rc == 1 and f"not the published {published}" in capsys.readouterr().err
    assert _cache_files() == []


def test_weights_download_list_verify_and_path(server, port_pth, tmp_path, capsys):
    server.routes["/published/crfasrnn_weights.pth"] = Route(port_pth)
    assert main(["weights", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(cache_dir())
    assert main(["weights", "verify", "voc-coco"]) == 1  # not downloaded yet: says how
    assert "crfasrnn weights download voc-coco" in capsys.readouterr().err

    assert main(["weights", "download", "voc-coco"]) == 0
    assert str(cache_dir() / "crfasrnn_weights.pth") in capsys.readouterr().out
    assert main(["weights", "list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in REGISTRY)
    assert "crfasrnn_weights.pth             cached" in listing
    assert f"{server.url}/published/crfasrnn_weights.pth" in listing  # the base-URL override is shown

    assert main(["weights", "verify", "voc-coco"]) == 0
    out = capsys.readouterr().out
    assert "port-pth, 21 classes" in out and hashlib.sha256(port_pth).hexdigest() in out

    cached = cache_dir() / "crfasrnn_weights.pth"
    damaged = bytearray(cached.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    cached.write_bytes(bytes(damaged))
    assert main(["weights", "verify", "voc-coco"]) == 1
    assert "changed since it was downloaded" in capsys.readouterr().err
    with pytest.raises(DownloadError, match="changed since it was downloaded"):  # and so does every later use
        load_model("voc-coco")

    local = tmp_path / "local.pth"
    local.write_bytes(port_pth[: len(port_pth) // 2])  # a truncated local file: the structural check
    assert main(["weights", "verify", str(local)]) == 1
    assert "local.pth" in capsys.readouterr().err


def test_a_local_path_is_used_as_it_is(port_pth, tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(port_pth)
    assert resolve(path) == path and verify(path) == path
    with pytest.raises(FileNotFoundError, match="not a URL, and not a registered name: voc-coco"):
        resolve(tmp_path / "nope.pth")
    assert os.environ["CRFASRNN_WEIGHTS_BASE_URL"].startswith("http://127.0.0.1:")  # (conftest: never the internet)


def test_the_licence_travels_with_files_made_from_the_published_weights(port_pth, tmp_path):
    from crfasrnn.weights import convert_weights, read_weights

    source = tmp_path / "crfasrnn_weights.pth"
    source.write_bytes(port_pth)
    _, info = read_weights(source)
    assert "non-commercial" in info.metadata["licence"]
    converted = convert_weights(source, tmp_path / "ours.safetensors")
    assert read_weights(tmp_path / "ours.safetensors")[1].metadata["licence"] == converted.metadata["licence"]
