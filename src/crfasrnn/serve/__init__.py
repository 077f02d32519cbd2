"""``crfasrnn serve``: the live demo in a browser — a small FastAPI app with one page and a JSON API.

Needs the ``serve`` extra (``pip install crfasrnn[serve]``: FastAPI, uvicorn, python-multipart).

Example (in-process, no network):
    >>> from fastapi.testclient import TestClient
    >>> from crfasrnn.serve import Engine, create_app
    >>> client = TestClient(create_app(Engine()))
    >>> client.post("/api/refine", data={"sample": "true", "num_iterations": "1"}).json()["views"][0]["key"]
    'refined'
"""

from __future__ import annotations

import logging

from .app import create_app
from .engine import ClientError, Engine, Limits

__all__ = ["Engine", "Limits", "ClientError", "create_app", "run_server"]

logger = logging.getLogger(__name__)


def run_server(engine: Engine, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``engine`` with uvicorn until interrupted (blocks). Listens on 127.0.0.1 unless told otherwise."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: the server is reachable from other machines", host)
    uvicorn.run(create_app(engine), host=host, port=port, log_level=log_level, workers=1)
