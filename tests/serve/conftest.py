"""Fixtures of the web-app tests: the two engines (refinement, and segmentation with a tiny network), in-process
clients of their apps, and a real uvicorn server.

FastAPI and uvicorn are imported inside the fixtures, never at import time: without the serve extra the test modules
skip (``pytest.importorskip``) and this file must still load.
"""

from __future__ import annotations

import pytest
from serve_helpers import LiveServer, tiny_network


@pytest.fixture(scope="session")
def refine_engine():
    """Refinement mode (no weights), working at most 128 px so that requests take well under a second."""
    from crfasrnn.serve import Engine, Limits

    return Engine(limits=Limits(work_side=128))


@pytest.fixture(scope="session")
def segment_engine():
    from crfasrnn.serve import Engine, Limits

    return Engine(tiny_network(), limits=Limits(work_side=128), network_size=96)


@pytest.fixture
def client(refine_engine):
    from fastapi.testclient import TestClient

    from crfasrnn.serve import create_app

    with TestClient(create_app(refine_engine), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def segment_client(segment_engine):
    from fastapi.testclient import TestClient

    from crfasrnn.serve import create_app

    with TestClient(create_app(segment_engine), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def live_server(refine_engine):
    from crfasrnn.serve import create_app

    with LiveServer(create_app(refine_engine)) as server:
        yield server
