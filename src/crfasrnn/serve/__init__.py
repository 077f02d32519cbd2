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

import asyncio
import logging
import socket

from .app import create_app
from .engine import ClientError, Engine, Limits

__all__ = ["Engine", "Limits", "ClientError", "create_app", "run_server"]

logger = logging.getLogger(__name__)

#: After Ctrl+C (or SIGTERM), requests in flight get this long to finish; then they are cancelled and the server stops.
SHUTDOWN_TIMEOUT_S = 5.0


def _check_bindable(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _not_a_cancellation(record: logging.LogRecord) -> bool:
    """Drop uvicorn's tracebacks of requests cancelled at shutdown (past the grace period, or by a second Ctrl+C):
    those cancellations are the shutdown itself, not errors."""
    return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, remembering the signal that stopped it."""

        stopped_by: int | None = None

        def handle_exit(self, sig, frame) -> None:
            self.stopped_by = sig
            super().handle_exit(sig, frame)

    return Server


def run_server(engine: Engine, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Serve ``engine`` with uvicorn until interrupted (blocks). Listens on 127.0.0.1 unless told otherwise.

    Raises:
        OSError: the address cannot be listened on (in use, or not this machine's).
    """
    import uvicorn

    if not 0 <= port <= 65535:
        raise ValueError(f"port must lie in 0..65535, got {port}")
    _check_bindable(host, port)
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: the server is reachable from other machines", host)
    logging.getLogger("uvicorn.error").addFilter(_not_a_cancellation)
    config = uvicorn.Config(
        create_app(engine),
        host=host,
        port=port,
        log_level=log_level,
        workers=1,
        # uvicorn annotates this int | None, but only hands it to asyncio.wait_for, which takes a float
        timeout_graceful_shutdown=SHUTDOWN_TIMEOUT_S,  # type: ignore[arg-type]
        timeout_keep_alive=5,
        lifespan="off",
    )
    server = _server_class()(config)
    server.run()  # uvicorn re-raises a caught Ctrl+C once stopped, where Python's own handler is installed ...
    if server.stopped_by is not None:  # ... and where it is not (SIGINT ignored, as in background jobs): the same
        raise KeyboardInterrupt
