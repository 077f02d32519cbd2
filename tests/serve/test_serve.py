"""The web app's JSON API, in process (FastAPI's TestClient) and on a real uvicorn server for concurrency."""

from __future__ import annotations

import inspect
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")

from PIL import Image
from serve_helpers import coarse_of, decode_png, png_bytes, two_region_photo

from crfasrnn.demo import DEMO_CLASSES
from crfasrnn.image import bundled_annotation_path, overlay, read_annotation
from crfasrnn.refine import refine
from crfasrnn.serve import Engine, Limits, create_app
from crfasrnn.serve.app import BodyLimitMiddleware
from crfasrnn.serve.engine import class_table, decode_image
from crfasrnn.transforms import VOC_CLASSES, postprocess, prepare


def _labels(view) -> np.ndarray:
    im = decode_png(view["labels_png"])
    assert im.mode == "P"  # a palette PNG: the colours travel with the labels
    return np.asarray(im).astype(np.int64)


def _palette(view) -> np.ndarray:
    return np.asarray(decode_png(view["labels_png"]).getpalette(), np.uint8).reshape(-1, 3)


def _files(photo, labels=None, **extra):
    """Multipart files: the photo, and a label map (default: the photo's left and right halves)."""
    if labels is None:
        labels = np.zeros(photo.shape[:2], np.uint8)
        labels[:, photo.shape[1] // 2 :] = 1
    return {
        "image": ("p.png", png_bytes(photo), "image/png"),
        "labels": ("l.png", png_bytes(labels, palette=labels.ndim == 2), "image/png"),
        **extra,
    }


def _photo(answer) -> np.ndarray:
    return np.array(decode_png(answer["photo_png"]).convert("RGB"))


def _view(answer, key):
    (view,) = [v for v in answer["views"] if v["key"] == key]
    return view


def _check_view_consistency(answer, view, names):
    """The class table counts the label map's pixels; the overlay is the photo blended with the label colours."""
    labels = _labels(view)
    palette = _palette(view)
    photo = _photo(answer)
    assert labels.shape == photo.shape[:2] == (answer["height"], answer["width"])
    counts = np.bincount(labels.reshape(-1), minlength=256)
    assert {row["label"]: row["pixels"] for row in view["classes"]} == {
        int(k): int(counts[k]) for k in np.flatnonzero(counts)
    }
    assert sum(row["share"] for row in view["classes"]) == pytest.approx(1.0)
    assert [row["pixels"] for row in view["classes"]] == sorted(
        (row["pixels"] for row in view["classes"]), reverse=True
    )
    for row in view["classes"]:
        assert row["name"] == names(row["label"])
        assert row["color"] == "#{:02x}{:02x}{:02x}".format(*palette[row["label"]])
    np.testing.assert_array_equal(
        np.asarray(decode_png(view["overlay_png"]).convert("RGB")), overlay(photo, labels, palette)
    )


# --- page and info -------------------------------------------------------------------------------------------------


def test_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert (
        '<script src="/static/app.js"' in page.text and 'id="overlay-img"' in page.text and 'id="legend"' in page.text
    )
    assert "default-src 'self'" in page.headers["content-security-policy"]
    script = client.get("/static/app.js")
    assert script.status_code == 200 and "/api/refine" in script.text
    assert client.get("/static/style.css").status_code == 200
    # no client path reaches the file system: anything but the two named files is 404
    for path in (
        "/static/index.html",
        "/static/..%2f..%2fpyproject.toml",
        "/static/%2e%2e/engine.py",
        "/pyproject.toml",
    ):
        assert client.get(path).status_code == 404, path


def test_info_in_refine_mode(client):
    info = client.get("/api/info").json()
    assert info["mode"] == "refine" and info["modes"] == ["refine"]
    assert info["classes"] == list(VOC_CLASSES)
    assert info["limits"]["max_upload_bytes"] == 10 * 1024 * 1024 and info["limits"]["max_side"] == 4096
    signature = inspect.signature(refine)
    names = [p["name"] for p in info["refine_parameters"]]
    assert names == [
        "num_iterations",
        "theta_alpha",
        "theta_beta",
        "theta_gamma",
        "spatial_weight",
        "bilateral_weight",
        "gt_prob",
    ]
    for p in info["refine_parameters"]:  # the sliders start at crfasrnn.refine's own defaults, within their range
        assert p["default"] == signature.parameters[p["name"]].default
        assert p["min"] <= p["default"] <= p["max"]


def test_class_table_by_hand():
    labels = np.array([[0, 0, 15], [15, 15, 15], [255, 255, 15]])
    table = class_table(labels, VOC_CLASSES)
    assert [(r["label"], r["name"], r["pixels"]) for r in table] == [
        (15, "person", 5),
        (0, "background", 2),
        (255, "unknown", 2),
    ]
    assert table[0]["share"] == pytest.approx(5 / 9) and table[0]["color"] == "#c08080"


# --- refinement mode -------------------------------------------------------------------------------------------------


def test_refine_sample_equals_the_library(client, refine_engine):
    params = {
        "num_iterations": 4,
        "theta_alpha": 40,
        "theta_beta": 10,
        "theta_gamma": 2,
        "spatial_weight": 2,
        "bilateral_weight": 6,
        "gt_prob": 0.6,
    }
    response = client.post("/api/refine", data={"sample": "true", **{k: str(v) for k, v in params.items()}})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["mode"] == "refine" and answer["source"] == "sample"
    assert max(answer["width"], answer["height"]) == 128  # work_side of the fixture
    photo = _photo(answer)
    np.testing.assert_array_equal(photo, refine_engine.sample_photo())
    # the input is the bundled annotation (crfasrnn demo's), brought to the photo's size
    annotation = read_annotation(bundled_annotation_path())
    coarse = np.asarray(Image.fromarray(annotation.labels.astype(np.uint8)).resize((128, 128), Image.NEAREST))
    coarse = coarse.astype(np.int64)
    np.testing.assert_array_equal(_labels(_view(answer, "input")), coarse)
    expected = refine(photo, labels=coarse, num_classes=len(DEMO_CLASSES), unknown_label=255, **params)
    refined = _labels(_view(answer, "refined"))
    np.testing.assert_array_equal(refined, expected)
    assert (refined != coarse).any()  # the CRF did something
    assert answer["parameters"] == params
    assert answer["seconds"] >= answer["compute_seconds"] > 0
    assert answer["classes"] == list(DEMO_CLASSES)
    for key in ("refined", "input"):
        _check_view_consistency(answer, _view(answer, key), lambda k: "unknown" if k == 255 else DEMO_CLASSES[k])


def test_refine_with_superpixels_equals_the_library(client, refine_engine):
    pytest.importorskip("skimage")
    info = client.get("/api/info").json()["superpixels"]
    assert info == {"available": True, "counts": [100, 200, 400]}
    answer = client.post("/api/refine", data={"sample": "true", "num_iterations": "3", "superpixels": "true"}).json()
    assert answer["parameters"]["superpixels"] == [100, 200, 400]
    photo = _photo(answer)
    coarse = _labels(_view(answer, "input"))
    common = {"num_classes": len(DEMO_CLASSES), "unknown_label": 255, "num_iterations": 3}
    expected = refine(photo, labels=coarse, superpixels=(100, 200, 400), **common)
    np.testing.assert_array_equal(_labels(_view(answer, "refined")), expected)
    assert (expected != refine(photo, labels=coarse, **common)).any()  # the toggle changes the result
    off = client.post("/api/refine", data={"sample": "true", "superpixels": "false"}).json()
    assert "superpixels" not in off["parameters"]


def test_refine_uploaded_labels_snap_to_the_edge(client):
    photo, truth = two_region_photo(48, 64, split=32)
    coarse = coarse_of(truth, shift=5, band=3)
    response = client.post(
        "/api/refine",
        files={
            "image": ("p.png", png_bytes(photo), "image/png"),
            "labels": ("l.png", png_bytes(coarse, palette=True), "image/png"),
        },
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["source"] == "upload" and answer["labels_source"] == "upload"
    np.testing.assert_array_equal(_photo(answer), photo)
    np.testing.assert_array_equal(_labels(_view(answer, "input")), coarse)
    refined = _labels(_view(answer, "refined"))
    assert (coarse[coarse != 255] != truth[coarse != 255]).mean() > 0.05  # the input is wrong on a band of columns
    assert (refined == truth).mean() > 0.99  # the refined boundary sits on the colour edge
    # a grayscale (mode L) label map reads the same as the palette one
    again = client.post(
        "/api/refine",
        files={
            "image": ("p.png", png_bytes(photo), "image/png"),
            "labels": ("l.png", png_bytes(coarse.astype(np.uint8)), "image/png"),
        },
    )
    np.testing.assert_array_equal(_labels(_view(again.json(), "refined")), refined)


def test_refine_of_an_upload_needs_a_label_map(client):
    photo, _ = two_region_photo(40, 40, split=20)
    response = client.post("/api/refine", files={"image": ("p.jpg", png_bytes(photo, fmt="JPEG"), "image/jpeg")})
    assert response.status_code == 400 and "needs a label map" in response.json()["error"]


def test_refine_colour_annotation_keeps_its_colours(client):
    photo, truth = two_region_photo(40, 60, split=30, vertical=False)
    coarse = coarse_of(truth, shift=4, band=2, vertical=False)
    colours = np.array([[255, 0, 0], [0, 0, 255]], np.uint8)  # the classic dense-CRF convention: black = unknown
    annotation = np.zeros(truth.shape + (3,), np.uint8)
    annotation[coarse == 0], annotation[coarse == 1] = colours[0], colours[1]
    answer = client.post("/api/refine", files=_files(photo, annotation)).json()
    refined_view, input_view = _view(answer, "refined"), _view(answer, "input")
    assert (_labels(refined_view) == truth).mean() > 0.98
    np.testing.assert_array_equal(_labels(input_view), np.where(coarse == 255, 255, coarse))
    assert {row["color"] for row in refined_view["classes"]} == {"#ff0000", "#0000ff"}
    for view in (refined_view, input_view):
        _check_view_consistency(answer, view, lambda k: "unknown" if k == 255 else f"colour {k}")


def test_zero_iterations_keep_the_input_labels(client):
    photo, truth = two_region_photo(32, 32, split=16)
    coarse = coarse_of(truth, shift=3, band=0)
    answer = client.post(
        "/api/refine",
        data={"num_iterations": "0"},
        files={
            "image": ("p.png", png_bytes(photo), "image/png"),
            "labels": ("l.png", png_bytes(coarse, palette=True), "image/png"),
        },
    ).json()
    np.testing.assert_array_equal(_labels(_view(answer, "refined")), coarse)


def test_raw_image_body(segment_client):
    photo, _ = two_region_photo(24, 40, split=20)
    response = segment_client.post("/api/segment", content=png_bytes(photo), headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    np.testing.assert_array_equal(_photo(response.json()), photo)
    sample = segment_client.post("/api/refine?sample=true&num_iterations=2")  # query parameters without a body
    assert sample.status_code == 200 and sample.json()["parameters"]["num_iterations"] == 2


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_iterations", "1000", "num_iterations must lie in 0..50"),
        ("theta_beta", "abc", "theta_beta must be a number"),
        ("gt_prob", "1.5", "gt_prob must lie in"),
        ("num_iterations", "2.5", "must be an integer"),
        ("theta_alpha", "nan", "theta_alpha must lie in"),
        ("superpixels", "maybe", "superpixels must be true or false"),
    ],
)
def test_bad_parameters_are_422(client, field, value, message):
    response = client.post("/api/refine", data={"sample": "true", field: value})
    assert response.status_code == 422 and message in response.json()["error"]


def test_segment_without_weights_is_409(client):
    response = client.post("/api/segment", data={"sample": "true"})
    assert response.status_code == 409 and "--weights" in response.json()["error"]


# --- bad uploads and limits -------------------------------------------------------------------------------------------


def _truncated_png() -> bytes:
    photo, _ = two_region_photo(64, 64)
    data = png_bytes(photo)
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "files, data, status, message",
    [
        ({"image": ("x.png", b"this is not an image", "image/png")}, {}, 400, "not an image file"),
        ({"image": ("x.png", b"", "image/png")}, {}, 400, "the image upload is empty"),
        ({"image": ("x.png", _truncated_png(), "image/png")}, {}, 400, "corrupt"),
        ({}, {"image": "a string, not a file"}, 400, "must be a file upload"),
        ({}, {}, 400, "no image"),
        (
            {
                "image": ("p.png", png_bytes(two_region_photo(32, 32)[0]), "image/png"),
                "labels": ("l.png", png_bytes(two_region_photo(32, 32)[0]), "image/png"),
            },
            {},
            400,
            "is it a photo",
        ),
        (
            {
                "image": ("p.png", png_bytes(two_region_photo(32, 32)[0]), "image/png"),
                "labels": ("l.png", png_bytes(np.zeros((32, 50), np.uint8)), "image/png"),
            },
            {},
            400,
            "sizes must agree",
        ),
        (
            {
                "image": ("p.png", png_bytes(two_region_photo(32, 32)[0]), "image/png"),
                "labels": ("l.png", png_bytes(np.full((32, 32), 255, np.uint8)), "image/png"),
            },
            {},
            400,
            "no labelled pixel",
        ),
        (
            {
                "image": ("p.png", png_bytes(two_region_photo(32, 32)[0]), "image/png"),
                "labels": ("l.png", png_bytes(np.full((32, 32), 300, np.uint16)), "image/png"),
            },
            {},
            400,
            "0..254",
        ),
    ],
    ids=[
        "not-an-image",
        "empty",
        "truncated",
        "text-field",
        "nothing",
        "rgb-labels",
        "labels-size",
        "all-unknown",
        "labels-range",
    ],
)
def test_bad_uploads_are_4xx_and_the_server_keeps_serving(client, files, data, status, message):
    response = client.post("/api/refine", files=files or None, data=data)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert client.post("/api/refine", data={"sample": "true", "num_iterations": "1"}).status_code == 200


def test_wrong_content_type_is_415(client):
    response = client.post(
        "/api/refine", content=json.dumps({"image": "/etc/passwd"}), headers={"content-type": "application/json"}
    )
    assert response.status_code == 415 and "multipart" in response.json()["error"]


def test_upload_size_limit():
    from fastapi.testclient import TestClient

    limits = Limits(max_upload_bytes=20_000, work_side=64)
    client = TestClient(create_app(Engine(limits=limits)))
    rng = np.random.default_rng(0)
    big = png_bytes(rng.integers(0, 256, size=(100, 100, 3), dtype=np.uint8))  # noise: ~30 kB of PNG
    assert len(big) > 20_000
    response = client.post("/api/refine", files={"image": ("big.png", big, "image/png")})
    assert response.status_code == 413 and "the image is 30" in response.json()["error"]  # checked per file
    huge = png_bytes(rng.integers(0, 256, size=(200, 200, 3), dtype=np.uint8))  # and per request, while reading
    response = client.post("/api/refine", files={"image": ("huge.png", huge, "image/png")})
    assert response.status_code == 413 and "upload too large" in response.json()["error"]
    small = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    assert client.post("/api/refine", files=_files(small)).status_code == 200


def _run_asgi(middleware, headers, chunks):
    """Drive the middleware with a streamed body; return (status, body, number of chunks it read, app called)."""
    import asyncio

    read = []
    sent = []
    called = []

    async def app(scope, receive, send):
        called.append(True)

    async def receive():
        if len(read) < len(chunks):
            read.append(chunks[len(read)])
            return {"type": "http.request", "body": read[-1], "more_body": len(read) < len(chunks)}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "headers": headers, "path": "/api/refine"}
    asyncio.run(BodyLimitMiddleware(app, max_bytes=middleware)(scope, receive, send))
    status = sent[0]["status"] if sent else None
    body = json.loads(sent[1]["body"]) if len(sent) > 1 else None
    return status, body, len(read), bool(called)


def test_body_limit_is_enforced_while_reading():
    chunks = [b"x" * 1000] * 100  # 100 kB, streamed without a Content-Length
    status, body, read, called = _run_asgi(10_000, [], chunks)
    assert status == 413 and "upload too large" in body["error"]
    assert read == 11 and not called  # it stopped at the first chunk past the limit, and the app never ran
    # a declared Content-Length over the limit is refused before a byte is read
    status, _, read, called = _run_asgi(10_000, [(b"content-length", b"100000")], chunks)
    assert (status, read, called) == (413, 0, False)
    # within the limit the whole body reaches the app
    status, _, read, called = _run_asgi(10_000, [], chunks[:5])
    assert (status, read, called) == (None, 5, True)


def test_large_images_are_downscaled_or_refused():
    from fastapi.testclient import TestClient

    photo, truth = two_region_photo(100, 200, split=100)
    down = TestClient(create_app(Engine(limits=Limits(max_side=150, work_side=64))))
    answer = down.post("/api/refine", files=_files(photo, truth.astype(np.uint8))).json()
    assert (answer["width"], answer["height"]) == (64, 32)
    assert any("downscaled from 200x100" in note and "150 px limit" in note for note in answer["notes"])
    expected = np.zeros((32, 64), np.int64)
    expected[:, 32:] = 1
    np.testing.assert_array_equal(_labels(_view(answer, "input")), expected)  # the label map is resized with them
    refuse = TestClient(create_app(Engine(limits=Limits(max_side=150, work_side=64, downscale=False))))
    response = refuse.post("/api/refine", files=_files(photo))
    assert response.status_code == 413
    assert "200x100" in response.json()["error"] and "150x150" in response.json()["error"]
    # beyond max_pixels an image is refused before its pixels are decoded, even when downscaling is on
    bomb = TestClient(create_app(Engine(limits=Limits(max_side=16, max_pixels=10_000, work_side=16))))
    response = bomb.post("/api/refine", files=_files(photo))
    assert response.status_code == 413 and "200x100" in response.json()["error"]


def test_decode_image_sizes_and_notes():
    photo, _ = two_region_photo(100, 120, split=60)  # within max_side: only brought to work_side, with a note
    decoded, notes = decode_image(png_bytes(photo), Limits(max_side=150, work_side=64))
    assert decoded.shape == (53, 64, 3) and "processed at most 64 px" in notes[0]
    decoded, notes = decode_image(png_bytes(photo), Limits(max_side=150, work_side=120))
    np.testing.assert_array_equal(decoded, photo)
    assert notes == []


def test_image_modes_are_converted():
    photo, _ = two_region_photo(30, 30, split=15)
    grey = np.asarray(Image.fromarray(photo).convert("L"))
    rgba = np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)])
    sixteen = grey.astype(np.uint16) * 256
    for data, expected in (
        (png_bytes(grey), np.repeat(grey[..., None], 3, axis=2)),
        (png_bytes(rgba), photo),
        (png_bytes(sixteen), np.repeat(grey[..., None], 3, axis=2)),
    ):
        np.testing.assert_array_equal(decode_image(data, Limits())[0], expected)


def test_exif_orientation_is_applied():
    photo, _ = two_region_photo(20, 40, split=20)
    im = Image.fromarray(photo)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buffer = io.BytesIO()
    im.save(buffer, format="JPEG", exif=exif, quality=95)
    decoded, _ = decode_image(buffer.getvalue(), Limits())
    assert decoded.shape == (40, 20, 3)
    rotated = np.rot90(photo, -1).astype(float)  # what a viewer shows: the two regions one above the other
    assert np.abs(decoded.astype(float) - rotated).mean() < 6  # JPEG noise only
    assert np.abs(decoded.astype(float) - np.rot90(photo, 1).astype(float)).mean() > 40


def test_a_server_fault_is_500_and_the_next_request_works(refine_engine, monkeypatch):
    from fastapi.testclient import TestClient

    client = TestClient(create_app(refine_engine), raise_server_exceptions=False)
    original = refine_engine.refine

    def broken(*args, **kwargs):
        raise RuntimeError("simulated fault")

    monkeypatch.setattr(refine_engine, "refine", broken)
    response = client.post("/api/refine", data={"sample": "true"})
    assert response.status_code == 500 and "simulated fault" in response.json()["error"]
    monkeypatch.setattr(refine_engine, "refine", original)
    assert client.post("/api/refine", data={"sample": "true", "num_iterations": "1"}).status_code == 200


# --- concurrency on a real server ----------------------------------------------------------------------------------


def test_parallel_requests_get_their_own_results(live_server):
    import httpx

    cases = []
    for seed, (vertical, split) in enumerate([(True, 20), (False, 30), (True, 44), (False, 12)]):
        photo, truth = two_region_photo(56, 64, split=split, vertical=vertical, seed=seed)
        cases.append((photo, truth, coarse_of(truth, shift=4, band=2, vertical=vertical)))

    def post(case):
        photo, _, coarse = case
        with httpx.Client(base_url=live_server.url, timeout=120) as http:
            response = http.post(
                "/api/refine",
                data={"num_iterations": "5"},
                files={
                    "image": ("p.png", png_bytes(photo), "image/png"),
                    "labels": ("l.png", png_bytes(coarse, palette=True), "image/png"),
                },
            )
        assert response.status_code == 200, response.text
        return response.json()

    sequential = [post(case) for case in cases]
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        parallel = list(pool.map(post, cases * 2))
    for i, answer in enumerate(parallel):
        photo, truth, coarse = cases[i % len(cases)]
        np.testing.assert_array_equal(_photo(answer), photo)
        np.testing.assert_array_equal(_labels(_view(answer, "input")), coarse)
        refined = _labels(_view(answer, "refined"))
        np.testing.assert_array_equal(refined, _labels(_view(sequential[i % len(cases)], "refined")))
        assert (refined == truth).mean() > 0.98


# --- segmentation mode (a tiny network with random weights) ---------------------------------------------------------


def test_segment_crf_and_fcn_views_equal_the_network(segment_client, segment_engine):
    info = segment_client.get("/api/info").json()
    assert info["mode"] == "segment" and info["modes"] == ["segment", "refine"]
    response = segment_client.post("/api/segment", data={"sample": "true"})
    assert response.status_code == 200, response.text
    answer = response.json()
    photo = _photo(answer)
    np.testing.assert_array_equal(photo, segment_engine.sample_photo())
    net = segment_engine.model
    prepared = prepare(photo, max_size=96)
    with torch.no_grad():
        x = prepared.tensor[None]
        expected_crf = postprocess(net(x)[0], prepared.resized_size, prepared.original_size)
        expected_fcn = postprocess(net.unary(x)[0], prepared.resized_size, prepared.original_size)
    crf, fcn = _labels(_view(answer, "crf")), _labels(_view(answer, "fcn"))
    np.testing.assert_array_equal(crf, expected_crf)
    np.testing.assert_array_equal(fcn, expected_fcn)
    assert len(np.unique(fcn)) > 1 and (crf != fcn).any()  # two different results behind the toggle
    for key in ("crf", "fcn"):
        _check_view_consistency(answer, _view(answer, key), lambda k: VOC_CLASSES[k])


def test_segment_upload_and_refine_in_segment_mode(segment_client):
    photo, truth = two_region_photo(40, 60, split=30)
    answer = segment_client.post("/api/segment", files={"image": ("p.png", png_bytes(photo), "image/png")}).json()
    assert (answer["width"], answer["height"]) == (60, 40) and _labels(_view(answer, "crf")).shape == (40, 60)
    coarse = coarse_of(truth, shift=4, band=2)
    response = segment_client.post(
        "/api/refine",
        files={
            "image": ("p.png", png_bytes(photo), "image/png"),
            "labels": ("l.png", png_bytes(coarse, palette=True), "image/png"),
        },
    )
    assert response.status_code == 200 and (_labels(_view(response.json(), "refined")) == truth).mean() > 0.98
    bad = segment_client.post("/api/segment", files={"image": ("p.png", b"GIF89a broken", "image/gif")})
    assert bad.status_code == 400 and ("corrupt" in bad.json()["error"] or "not an image" in bad.json()["error"])


# --- the command line ------------------------------------------------------------------------------------------------


@pytest.fixture
def captured_server(monkeypatch):
    """Replace run_server with a recorder: the CLI builds the engine as usual but does not block."""
    import crfasrnn.serve

    calls = []
    monkeypatch.setattr(crfasrnn.serve, "run_server", lambda engine, **kw: calls.append((engine, kw)))
    return calls


def test_cli_serve_options(captured_server, monkeypatch, capsys):
    from crfasrnn.cli import main

    monkeypatch.delenv("CRFASRNN_WEIGHTS", raising=False)
    assert main(["serve", "--max-upload-mb", "2", "--max-side", "1000", "--refuse-oversize", "--work-side", "300"]) == 0
    engine, kwargs = captured_server[0]
    assert kwargs["host"] == "127.0.0.1" and kwargs["port"] == 8000  # this machine only, unless told otherwise
    assert engine.mode == "refine"
    assert engine.limits == Limits(max_upload_bytes=2 * 1024 * 1024, max_side=1000, downscale=False, work_side=300)
    assert "http://127.0.0.1:8000/" in capsys.readouterr().out


def test_cli_serve_with_synthetic_weights(captured_server, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient
    from serve_helpers import tiny_network

    from crfasrnn.cli import main
    from crfasrnn.weights import file_sha256, save_weights

    net = tiny_network(seed=1)
    path = tmp_path / "tiny.pt"
    save_weights(net, path)
    monkeypatch.setenv("CRFASRNN_WEIGHTS", str(path))  # the environment variable stands in for --weights
    import crfasrnn.weights

    loads = []
    real_load_model = crfasrnn.weights.load_model
    monkeypatch.setattr(crfasrnn.weights, "load_model", lambda *a, **k: loads.append(a) or real_load_model(*a, **k))
    assert main(["serve", "--host", "0.0.0.0", "--port", "8123", "--iterations", "2", "--work-side", "64"]) == 0
    engine, kwargs = captured_server[0]
    assert (kwargs["host"], kwargs["port"]) == ("0.0.0.0", 8123)
    client = TestClient(create_app(engine))
    info = client.get("/api/info").json()
    assert info["mode"] == "segment" and info["classes"] == list(VOC_CLASSES)
    assert info["weights"]["sha256"] == file_sha256(path) and info["weights"]["file"] == "tiny.pt"
    assert engine.model.crf.num_iterations == 2
    answer = client.post("/api/segment", data={"sample": "true"}).json()
    photo = _photo(answer)
    net.crf.num_iterations = 2
    prepared = prepare(photo)  # the published network size (500)
    with torch.no_grad():
        expected = postprocess(net(prepared.tensor[None])[0], prepared.resized_size, prepared.original_size)
    np.testing.assert_array_equal(_labels(_view(answer, "crf")), expected)
    assert client.post("/api/segment", data={"sample": "true"}).status_code == 200
    assert len(loads) == 1  # the model was loaded once, at start-up, not per request


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "--weights", "/nonexistent/w.pt"], "not found"),
        (["serve", "--device", "cuda:99"], "cuda"),
        (["serve", "--max-upload-mb", "0"], "--max-upload-mb"),
        (["serve", "--max-side", "0"], "max_side"),
    ],
)
def test_cli_serve_errors_are_one_line(argv, message, captured_server, capsys, monkeypatch):
    from crfasrnn.cli import main

    monkeypatch.delenv("CRFASRNN_WEIGHTS", raising=False)
    if message == "cuda" and torch.cuda.device_count() > 99:  # pragma: no cover
        pytest.skip("this machine has a cuda:99")
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("crfasrnn serve: error:") and "\n" not in err and message in err
    assert not captured_server


def test_cli_serve_port_in_use(capsys):
    import socket

    from crfasrnn.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("crfasrnn serve: error: cannot listen on 127.0.0.1:") and "\n" not in err


def test_cli_serve_really_serves(tmp_path):
    """`crfasrnn serve` in its own process answers on the port it was given, until it is stopped."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx
    from serve_helpers import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "CRFASRNN_WEIGHTS"}
    process = subprocess.Popen(
        [sys.executable, "-m", "crfasrnn", "serve", "--port", str(port), "--work-side", "64"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                info = httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=5).json()
                break
            except httpx.TransportError:
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline, "the server did not answer within 60 s"
                time.sleep(0.2)
        assert info["mode"] == "refine" and info["limits"]["work_side"] == 64
        answer = httpx.post(
            f"http://127.0.0.1:{port}/api/refine", data={"sample": "true", "num_iterations": "1"}, timeout=60
        )
        assert answer.status_code == 200 and answer.json()["width"] == 64
        bad = httpx.post(f"http://127.0.0.1:{port}/api/refine", files={"image": ("x.png", b"junk", "image/png")})
        assert bad.status_code == 400
        assert httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=5).status_code == 200  # still serving
    finally:
        process.send_signal(signal.SIGINT)
        out, _err = process.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/" in out
