"""The FastAPI application: one page, its two static files, and the JSON API around an :class:`~.engine.Engine`.

Routes:
    ``GET /``: the page. ``GET /static/app.js``, ``GET /static/style.css``: its script and style (read from the package
    once; no client path is ever mapped to a file). ``GET /api/info``: mode, classes, limits, refinement parameters.
    ``POST /api/segment`` and ``POST /api/refine``: multipart forms (or a raw image body) answered with base64 PNGs and
    the class table. Errors are JSON ``{"error": message}`` with a 4xx status (5xx for a server fault); a failing
    request never stops the server.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from importlib import resources
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .engine import ClientError, Engine, RefineParams, decode_image, decode_labels, header_size

__all__ = ["create_app", "BodyLimitMiddleware"]

logger = logging.getLogger(__name__)

#: Room for the multipart framing and the small form fields beside the uploaded files.
FORM_OVERHEAD_BYTES = 64 * 1024

_STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class BodyLimitMiddleware:
    """ASGI middleware that refuses request bodies over ``max_bytes`` with 413 while they are read, and bodies that do
    not arrive whole within ``body_timeout`` seconds with 408.

    A declared ``Content-Length`` over the limit is refused before any byte is read; otherwise the body is read up to
    the limit (the first byte past it ends the request with 413) and handed on to the application.
    """

    def __init__(self, app, max_bytes: int, body_timeout: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                declared_size = int(declared)
            except ValueError:
                await self._refuse(send, 400, "invalid Content-Length header")
                return
            if declared_size > self.max_bytes:
                await self._refuse(send, 413, self._message(declared_size))
                return
        chunks, total = [], 0
        deadline = asyncio.get_running_loop().time() + self.body_timeout
        while True:
            try:  # a client that stops sending mid-body is not waited for forever
                message = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                await self._refuse(send, 408, f"the request body did not arrive within {self.body_timeout:g} s")
                return
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                await self._refuse(send, 413, self._message(None))
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _message(self, size: int | None) -> str:
        limit = self.max_bytes - FORM_OVERHEAD_BYTES
        got = f"{size} bytes" if size is not None else "more than that"
        return f"upload too large: the limit is {limit} bytes ({limit / 2**20:.1f} MiB) per request, got {got}"

    @staticmethod
    async def _refuse(send, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


async def _compute(engine: Engine, fn, *args, **kwargs):
    """Run ``fn`` on the engine's compute thread (see :class:`Engine`) without blocking the event loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(engine.compute_thread, functools.partial(fn, *args, **kwargs))


def _read_static(name: str) -> bytes:
    return resources.files("crfasrnn.serve").joinpath("static").joinpath(name).read_bytes()


async def _field_file(form, name: str) -> bytes | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, UploadFile):
        if str(value) == "":
            return None
        raise ClientError(400, f"the form field {name!r} must be a file upload")
    data = await value.read()
    return data if data or value.filename else None


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


async def _inputs(request: Request, engine: Engine) -> tuple[dict[str, Any], Any, list[str], bytes | None, str]:
    """Parse a request: (form fields, photo, notes, label-map bytes, source of the photo)."""
    content_type = request.headers.get("content-type", "")
    fields: dict[str, Any] = {}
    labels_data = None
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        async with request.form(max_files=2, max_fields=32) as form:
            fields = {k: v for k, v in form.items() if not isinstance(v, UploadFile)}
            image_data = await _field_file(form, "image")
            labels_data = await _field_file(form, "labels")
    elif content_type.startswith(("image/", "application/octet-stream")):
        image_data = await request.body()
        fields = dict(request.query_params)
    elif not content_type and not await request.body():
        image_data = None
        fields = dict(request.query_params)
    else:
        raise ClientError(415, f"send a multipart form (field 'image') or an image body, not {content_type!r}")
    if image_data is not None:
        photo, notes = await run_in_threadpool(decode_image, image_data, engine.limits, what="image")
        request.state.original_size = header_size(image_data)  # what a label map of the upload may measure
        return fields, photo, notes, labels_data, "upload"
    if _truthy(fields.get("sample", request.query_params.get("sample", ""))):
        return fields, engine.sample_photo(), [], labels_data, "sample"
    raise ClientError(400, "no image: upload one in the form field 'image', or set sample=true for the bundled photo")


def create_app(engine: Engine):
    """The web application serving ``engine`` (FastAPI; the model is the engine's, loaded once by the caller).

    Example:
        >>> from fastapi.testclient import TestClient
        >>> client = TestClient(create_app(Engine()))
        >>> client.get("/api/info").json()["mode"]
        'refine'
    """
    from fastapi import FastAPI

    page = _read_static("index.html")
    static = {name: _read_static(name) for name in _STATIC}
    app = FastAPI(title="crfasrnn", docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi.json")
    app.state.engine = engine
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=engine.limits.max_upload_bytes + FORM_OVERHEAD_BYTES,
        body_timeout=engine.limits.body_timeout_s,
    )

    @app.exception_handler(ClientError)
    async def _client_error(request: Request, exc: ClientError) -> JSONResponse:
        logger.info("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=_SECURITY_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str) -> Response:
        if name not in static:  # a fixed table: the client's path never reaches the file system
            raise ClientError(404, f"no such file: {name[:60]}")
        return Response(static[name], media_type=_STATIC[name], headers=_SECURITY_HEADERS)

    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        """Mode (``segment`` with weights, else ``refine``), class names, limits and the refinement parameters."""
        return engine.info()

    @app.post("/api/segment")
    async def segment(request: Request) -> JSONResponse:
        """Segment an uploaded photo (form field ``image``) or the bundled one (``sample=true``) with CRF-RNN.

        Returns the photo, and views ``crf`` (FCN-8s + CRF-RNN) and ``fcn`` (FCN-8s alone), each with an overlay PNG,
        a palette label-map PNG (base64) and the table of classes present with their pixel share.
        """
        start = time.perf_counter()
        if engine.model is None:
            raise ClientError(409, "no weights are loaded: start the server with --weights FILE to segment photos")
        _, photo, notes, _, source = await _inputs(request, engine)
        result = await _compute(engine, engine.segment, photo, notes)
        return _answer(result, source, start)

    @app.post("/api/refine")
    async def refine(request: Request) -> JSONResponse:
        """Refine a label map (form field ``labels``, a palette or grayscale PNG, 255 = unknown) of a photo.

        With ``sample=true`` and no ``labels``, the bundled photo's coarse annotation is refined (as ``crfasrnn demo``
        does). Parameters (form fields): num_iterations, theta_alpha, theta_beta, theta_gamma,
        spatial_weight, bilateral_weight, gt_prob. Returns views ``refined`` and ``input``.
        """
        start = time.perf_counter()
        fields, photo, notes, labels_data, source = await _inputs(request, engine)
        params = RefineParams.parse(fields, engine.limits)
        if labels_data is not None:
            original = getattr(request.state, "original_size", None)
            labels = await run_in_threadpool(
                decode_labels, labels_data, photo.shape[:2], engine.limits, original=original
            )
            labels_source = "upload"
        elif source == "sample":
            labels = await _compute(engine, engine.sample_labels)
            labels_source = "sample"
        else:
            raise ClientError(
                400,
                "refinement needs a label map of the photo (form field 'labels': a palette, grey or colour PNG), "
                "or use the bundled sample (sample=true) with its coarse annotation",
            )
        result = await _compute(engine, engine.refine, photo, labels, params, notes, source=labels_source)
        return _answer(result, source, start)

    return app


def _answer(result: dict[str, Any], source: str, start: float) -> JSONResponse:
    result["source"] = source
    result["request_seconds"] = round(time.perf_counter() - start, 4)
    return JSONResponse(result)
