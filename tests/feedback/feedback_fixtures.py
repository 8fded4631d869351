"""Fixtures of the feedback tests: a small store of 2-D points and a real uvicorn server on 127.0.0.1
(built by server.make_server, as `feedback serve` builds it).

Not a conftest.py: tests/test_*.py import the root conftest as `conftest`, which a second one would
shadow. Test modules import the fixtures they use from here.
"""

import socket
import threading
import time

import numpy as np
import pytest

from scoreaction.feedback.app import create_app
from scoreaction.feedback.server import Limits, make_server
from scoreaction.feedback.store import PreferenceStore


def point_store(path, n_items: int = 10, n_queued: int = 0, task: str = "mixture", seed: int = 0):
    """A new store of n_items 2-D points (float32) and, optionally, the first n_queued pairs queued."""
    store = PreferenceStore(path, create=True)
    points = np.random.default_rng(seed).normal(size=(n_items, 2)).astype(np.float32)
    ids = store.add_items(points, task=task, model="test")
    pairs = [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]]
    store.enqueue_pairs(pairs[:n_queued])
    return store


@pytest.fixture
def make_store(tmp_path):
    """make_store(name="prefs.db", **point_store options) -> a new store in tmp_path."""
    return lambda name="prefs.db", **kw: point_store(tmp_path / name, **kw)


@pytest.fixture
def store(make_store):
    """10 points of task `mixture` (45 possible pairs), the first 30 pairs queued."""
    return make_store(n_items=10, n_queued=30)


class LiveServer:
    """uvicorn serving the labeling app on a free port of 127.0.0.1, in a background thread."""

    def __init__(self, app, limits: Limits = Limits()):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # else ~40 ms per keep-alive request
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(app, limits)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()
        assert not self.thread.is_alive(), "the test server did not stop"


@pytest.fixture
def live_server():
    """live_server(store_or_app, limits=Limits(), **create_app options) -> a running LiveServer; every
    server started is stopped at the end."""
    started = []

    def start(target, limits: Limits = Limits(), **kw):
        app = create_app(target, **kw) if isinstance(target, PreferenceStore) else target
        server = LiveServer(app, limits).__enter__()
        started.append(server)
        return server

    yield start
    for server in started:
        server.__exit__(None, None, None)


def next_and_answer(client, headers: dict, choice: str = "left"):
    """GET /api/next, then answer the pair it served: the response to the answer (an httpx or starlette
    client; the app must accept quick answers: min_response_ms=0)."""
    pair = client.get("/api/next", headers=headers).json()
    assert pair["done"] is False, pair
    return client.post("/api/answer", headers=headers,
                       json={"left": pair["left"]["id"], "right": pair["right"]["id"], "choice": choice})


@pytest.fixture
def answer_next():
    """answer_next(client, headers, choice="left") -> the response to answering the pair GET /api/next serves."""
    return next_and_answer
