"""Hostile request bodies against the labeling app, in process (starlette's TestClient): each gets its
documented 4xx with a JSON {"error": ...} body, never a 500; the store is untouched and the app serves on."""

import json

import pytest
from starlette.testclient import TestClient

from scoreaction.feedback.app import create_app

pytest_plugins = ["feedback_fixtures"]  # store, make_store, live_server, answer_next

DEEP = 60_000
HOSTILE = [
    ("deep array", b"[" * DEEP + b"]" * DEEP, 400, "malformed JSON: nested too deeply"),
    ("deep object", b'{"a": ' * DEEP + b"1" + b"}" * DEEP, 400, "malformed JSON: nested too deeply"),
    ("deep field", b'{"left": ' + b"[" * DEEP + b"]" * DEEP + b', "right": 2, "choice": "left"}', 400,
     "nested too deeply"),
    ("deep unclosed", b"[" * DEEP, 400, "malformed JSON"),
    ("5000-digit integer", b'{"left": 1, "right": ' + b"9" * 5000 + b', "choice": "left"}', 400,
     "malformed JSON: Exceeds the limit"),
    ("5000-digit negative", b'{"left": -' + b"9" * 5000 + b', "right": 2, "choice": "left"}', 400, "malformed JSON"),
    ("5000-digit bare", b"9" * 5000, 400, "malformed JSON"),
    ("5000-digit response_ms", b'{"left": 1, "right": 2, "choice": "left", "response_ms": ' + b"7" * 5000 + b"}",
     400, "malformed JSON"),
    ("5000-digit choice", b'{"left": 1, "right": 2, "choice": ' + b"7" * 5000 + b"}", 400, "malformed JSON"),
    ("1e999", b'{"left": 1, "right": 2, "choice": "left", "response_ms": 1e999}', 422, "response_ms"),
    ("Infinity", b'{"left": 1, "right": 2, "choice": "left", "response_ms": Infinity}', 422, "response_ms"),
    ("-Infinity", b'{"left": 1, "right": 2, "choice": "left", "response_ms": -Infinity}', 422, "response_ms"),
    ("NaN id", b'{"left": NaN, "right": 2, "choice": "left"}', 422, "left must be an item id"),
    ("float id", b'{"left": 1e5, "right": 2, "choice": "left"}', 422, "left must be an item id"),
    ("id beyond 64 bits", json.dumps({"left": 1, "right": 2**64, "choice": "left"}).encode(), 422,
     "item id must be an integer"),
    ("lone surrogate", b'{"left": 1, "right": 2, "choice": "\\ud800"}', 422, "choice must be one of"),
    ("bad UTF-8", b'{"left": 1, "right": 2, "choice": "\xff"}', 400, "malformed JSON"),
    ("NUL in a string", b'{"left": 1, "right": 2, "choice": "left\x00"}', 400, "malformed JSON"),
    ("trailing garbage", b'{"left": 1, "right": 2, "choice": "left"} x', 400, "malformed JSON"),
    ("50,000 keys", json.dumps({f"k{i}": i for i in range(50_000)}).encode(), 422, "unknown field"),
    ("1 MB string", json.dumps({"left": 1, "right": 2, "choice": "x" * 900_000}).encode(), 422,
     "choice must be one of"),
    ("a list", b"[1, 2]", 400, "expected a JSON object"),
    ("a string", b'"left"', 400, "expected a JSON object"),
    ("null", b"null", 400, "expected a JSON object"),
    ("empty", b"", 400, "malformed JSON"),
    ("whitespace", b"   \n ", 400, "malformed JSON"),
]


@pytest.fixture
def client(store):
    app = create_app(store, max_body=2_000_000, min_response_ms=0)  # 64 KiB would refuse most of these unread
    with TestClient(app, raise_server_exceptions=False) as c:
        token = store.add_labeler("ann")
        c.headers.update({"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        yield c


@pytest.mark.parametrize("name, body, status, message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_body_gets_its_4xx_never_a_500(client, store, answer_next, name, body, status, message):
    r = client.post("/api/answer", content=body)
    assert r.status_code == status, (name, r.status_code, r.text[:300])
    error = r.json()["error"]
    assert message in error and len(error) < 300 and "\n" not in error, error
    assert store.count_comparisons() == 0
    ok = answer_next(client, {})
    assert ok.status_code == 200 and store.count_comparisons() == 1  # still serving


def test_hostile_bodies_on_every_route_are_no_500(client):
    for method, url in [("POST", "/api/undo"), ("GET", "/api/next"), ("GET", "/api/progress"),
                        ("GET", "/api/items/1.png"), ("POST", "/api/next"), ("PUT", "/api/answer")]:
        for _, body, _, _ in HOSTILE[:6]:
            r = client.request(method, url, content=body)
            assert r.status_code < 500, (method, url, r.status_code)
