"""The labeling app's JSON API: the flow, tokens, bad input (4xx, store untouched, still serving), path
traversal, and many labelers answering at once over real HTTP."""

import http.client
import io
import json
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from scoreaction.feedback.render import item_kind, render_image

pytest_plugins = ["feedback_fixtures"]  # store, make_store, live_server, answer_next


@pytest.fixture
def client(store, live_server):
    """An HTTP client of the app served by uvicorn; .token and .auth (headers) are labeler ann's. Quick
    answers are accepted (min_response_ms=0): test_app_served.py tests the minimum."""
    server = live_server(store, seed=0, min_response_ms=0)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        c.token = store.add_labeler("ann")
        c.auth_headers = {"Authorization": f"Bearer {c.token}"}
        yield c


def test_page_and_its_files_are_served_with_a_strict_policy(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["referrer-policy"] == "no-referrer"
    for name, kind in [("app.js", "text/javascript"), ("app.css", "text/css")]:
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
        assert f"/static/{name}" in page.text


def test_next_answer_progress_undo(client, store):
    first = client.get("/api/next", headers=client.auth_headers).json()
    assert first["done"] is False and first["task"] == "mixture" and first["progress"]["remaining"] == 30
    left, right = first["left"]["id"], first["right"]["id"]
    assert {left, right} == {1, 2} and first["left"]["kind"] == "point"
    assert first["left"]["caption"].startswith("x = (")
    r = client.post("/api/answer", headers=client.auth_headers, json={"left": left, "right": right, "choice": "right",
                                                              "response_ms": 950})
    assert r.status_code == 200 and r.json()["progress"]["answered"] == 1
    assert [(c["left"], c["right"], c["choice"], c["labeler"]) for c in store.comparisons()] == \
        [(left, right, "right", "ann")]
    assert store.comparisons()[0]["response_ms"] == r.json()["response_ms"] < 950  # measured by the server
    second = client.get("/api/next", headers=client.auth_headers).json()
    assert {second["left"]["id"], second["right"]["id"]} == {1, 3}
    assert client.get("/api/progress", headers=client.auth_headers).json() == {"labeler": "ann", "answered": 1, "queued": 30,
                                                                       "remaining": 29}
    undo = client.post("/api/undo", headers=client.auth_headers).json()
    assert undo["undone"] == {"left": left, "right": right, "choice": "right"}
    assert (undo["left"]["id"], undo["right"]["id"]) == (left, right)  # shown again, as it was
    assert store.count_comparisons() == 0
    assert client.post("/api/undo", headers=client.auth_headers).json()["undone"] is None


def test_items_are_drawn_as_pngs(client, store):
    r = client.get("/api/items/3.png", headers=client.auth_headers)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    im = Image.open(io.BytesIO(r.content))
    assert im.format == "PNG" and im.size == (288, 288)
    pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    assert ((pixels[:, 0] > 200) & (pixels[:, 1] < 80)).sum() > 50  # the red dot of the item itself


def test_images_are_upscaled_with_nearest_neighbour():
    digit = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 8, 8)
    im = Image.open(io.BytesIO(render_image(digit)))
    assert im.size == (288, 288) and im.mode == "L"
    big = np.asarray(im)
    assert np.array_equal(big[::36, ::36], np.round((digit[0] + 1) * 127.5).astype(np.uint8))
    assert item_kind((1, 8, 8)) == "image" and item_kind((2,)) == "point" and item_kind((50, 2)) == "points"
    assert item_kind((16, 16, 3)) == "image" and item_kind((5, 5, 5)) == "unknown"


def test_every_api_route_needs_a_valid_token(client, store):
    routes = [("GET", "/api/next"), ("POST", "/api/answer"), ("POST", "/api/undo"), ("GET", "/api/progress"),
              ("GET", "/api/items/1.png")]
    for headers in [{}, {"Authorization": "Bearer nope-not-a-token-at-all"}, {"Authorization": client.token},
                    {"Authorization": f"Basic {client.token}"}, {"X-Token": client.token}]:
        for method, url in routes:
            r = client.request(method, url, headers=headers, json={"left": 1, "right": 2, "choice": "left"})
            assert r.status_code == 401, (method, url, headers)
            assert "token" in r.json()["error"]
    assert store.count_comparisons() == 0


BAD_ANSWERS = [
    (b"{not json", 400, "malformed JSON"),
    (b"\xff\xfe", 400, "malformed JSON"),
    (b"[1, 2, 3]", 400, "expected a JSON object"),
    (b"", 400, "malformed JSON"),
    (json.dumps({"left": 1, "right": 2}), 422, "choice must be one of"),
    (json.dumps({"left": 1, "right": 2, "choice": "both"}), 422, "choice must be one of"),
    (json.dumps({"left": 1, "right": 2, "choice": "LEFT"}), 422, "choice must be one of"),
    (json.dumps({"left": 1, "right": 2, "choice": "left", "labeler": "mallory"}), 422, "unknown field 'labeler'"),
    (json.dumps({"left": "1", "right": 2, "choice": "left"}), 422, "left must be an item id"),
    (json.dumps({"left": True, "right": 2, "choice": "left"}), 422, "left must be an item id"),
    (json.dumps({"left": 1, "right": 2.5, "choice": "left"}), 422, "right must be an item id"),
    (json.dumps({"left": 1, "right": 999, "choice": "left"}), 422, "unknown item id 999"),
    (json.dumps({"left": 1, "right": 10**30, "choice": "left"}), 422, "item id must be an integer"),
    (json.dumps({"left": 4, "right": 4, "choice": "left"}), 422, "two different items"),
    (json.dumps({"left": 1, "right": 2, "choice": "tie", "response_ms": -1}), 422, "response_ms"),
    (json.dumps({"left": 1, "right": 2, "choice": "tie", "response_ms": "fast"}), 422, "response_ms"),
    (b'{"left": 1, "right": 2, "choice": "tie", "response_ms": NaN}', 422, "response_ms"),
    (json.dumps({"left": 1, "right": 2, "choice": "left", "pad": "x" * 70_000}), 413, "exceeds the limit"),
]


def test_bad_answers_get_a_4xx_and_leave_the_store_untouched(client, store, answer_next):
    headers = {**client.auth_headers, "Content-Type": "application/json"}
    for k, (body, status, message) in enumerate(BAD_ANSWERS):
        r = client.post("/api/answer", headers=headers, content=body)
        assert r.status_code == status and message in r.json()["error"], (body, r.text)
        assert store.count_comparisons() == k, body
        ok = answer_next(client, client.auth_headers)  # still serving
        assert ok.status_code == 200 and store.count_comparisons() == k + 1


def test_a_chunked_oversized_body_is_refused_while_read(client, store):
    chunks = (b"x" * 8192 for _ in range(20))  # no Content-Length: counted as it arrives
    r = client.post("/api/answer", headers=client.auth_headers, content=chunks)
    assert r.status_code == 413 and store.count_comparisons() == 0


def test_a_pair_is_answered_once_per_labeler(client, store):
    answer = {"left": 1, "right": 2, "choice": "left"}
    client.get("/api/next", headers=client.auth_headers)  # serves the first queued pair, (1, 2)
    assert client.post("/api/answer", headers=client.auth_headers, json=answer).status_code == 200
    again = client.post("/api/answer", headers=client.auth_headers, json={**answer, "left": 2, "right": 1})
    assert again.status_code == 409 and "already answered" in again.json()["error"]
    assert store.count_comparisons() == 1


def test_hostile_bodies_are_400_not_500(store, live_server, answer_next):
    """Bodies that break a JSON parser or a validator: far too deep, an integer far too long, bad UTF-8."""
    server = live_server(store, max_body=1_000_000, min_response_ms=0)  # the deep array exceeds the default 64 KiB
    token = store.add_labeler("ann")
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    hostile = [
        b"[" * 60_000 + b"]" * 60_000,
        b'{"left": ' + b"[" * 60_000 + b"]" * 60_000 + b', "right": 2, "choice": "left"}',
        b'{"left": 1, "right": 2, "choice": "left", "response_ms": ' + b"7" * 5_000 + b"}",
        b'{"left": 1, "right": ' + b"9" * 5_000 + b', "choice": "left"}',
        b'{"left": 1, "right": 2, "choice": "\xff"}',
    ]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for body in hostile:
            r = c.post("/api/answer", headers=headers, content=body)
            assert r.status_code == 400 and "malformed JSON" in r.json()["error"], (body[:60], r.text[:200])
        for body, field in [(b'{"left": ' + b"[" * 900 + b"]" * 900 + b', "right": 2, "choice": "left"}', "left"),
                            (b'{"left": 1, "right": 2, "choice": ' + b"7" * 4_000 + b"}", "choice")]:
            r = c.post("/api/answer", headers=headers, content=body)  # parsed, then refused with a short message
            assert r.status_code == 422 and r.json()["error"].startswith(f"{field} must be"), r.text[:200]
            assert len(r.json()["error"]) < 200
        ok = answer_next(c, headers)
        assert ok.status_code == 200  # still serving
    assert store.count_comparisons() == 1
    with httpx.Client(base_url=live_server(store).url, timeout=30) as c:  # the default limit
        r = c.post("/api/answer", headers=headers, content=hostile[0])
        assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]


def test_an_answer_must_be_sent_as_json(client, store):
    body = json.dumps({"left": 1, "right": 2, "choice": "left"})
    for content_type in ["text/plain", "application/x-www-form-urlencoded"]:
        r = client.post("/api/answer", headers={**client.auth_headers, "Content-Type": content_type}, content=body)
        assert r.status_code == 400 and "application/json" in r.json()["error"]
    assert store.count_comparisons() == 0


def test_a_413_is_json_with_the_usual_headers_and_a_huge_length_is_no_500(client, store):
    r = client.post("/api/answer", headers=client.auth_headers, content=b"x" * 70_000)
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]
    assert r.headers["x-frame-options"] == "DENY" and "default-src 'none'" in r.headers["content-security-policy"]
    assert r.headers["cache-control"] == "no-store"
    conn = http.client.HTTPConnection("127.0.0.1", httpx.URL(str(client.base_url)).port, timeout=10)
    conn.putrequest("POST", "/api/answer")
    conn.putheader("Authorization", f"Bearer {client.token}")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", "9" * 40)
    conn.endheaders()
    response = conn.getresponse()
    assert response.status in (400, 413), response.status  # refused by the server or by the app, never a 500
    conn.close()
    assert store.count_comparisons() == 0


def test_unknown_things_are_404(client):
    for url in ["/api/items/999.png", "/api/items/abc.png", "/api/items/1.jpg", "/api/items/-1.png", "/api/items/1",
                "/api/items/01x.png", "/api/items/1.0.png", "/api/items/+1.png", "/api/items/%201.png",
                "/api/items/%D9%A1.png", f"/api/items/{2**63}.png", f"/api/items/{'9' * 5000}.png",
                "/static/missing.js", "/static/__init__.py", "/static/", "/nowhere"]:
        r = client.get(url, headers=client.auth_headers)
        assert r.status_code == 404 and "error" in r.json(), url


TRAVERSALS = [
    "/static/../../pyproject.toml", "/static/..%2f..%2fpyproject.toml", "/static/%2e%2e/%2e%2e/pyproject.toml",
    "/static/%2e%2e%2f%2e%2e%2f%2e%2e%2fpyproject.toml", "/static/..%5c..%5cpyproject.toml",
    "/static/%252e%252e%252fpyproject.toml", "/static//etc/passwd", "/static/%2fetc%2fpasswd",
    "/static/..%2fstore.py", "/static/..%2f..%2fprefs.db", "/static/app.js%00.png",
    "/api/items/../../etc/passwd", "/api/items/..%2f..%2fetc%2fpasswd", "/api/items/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/api/items/1.png%2f..%2f..%2fprefs.db", "/api/items/..%2f..%2f..%2fpyproject.toml", "/../pyproject.toml",
    "/..%2fpyproject.toml", "/%2e%2e/%2e%2e/etc/passwd",
]


def test_no_request_path_reaches_the_file_system(store, live_server):
    server = live_server(store)
    token = store.add_labeler("ann")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    for path in TRAVERSALS:  # sent byte for byte: http.client does not normalise the path
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        r = conn.getresponse()
        body = r.read()
        assert r.status in (400, 404, 422), (path, r.status)
        for secret in (b"[build-system]", b"root:", b"SQLite format", b"import "):
            assert secret not in body, path
    conn.close()


def test_many_labelers_at_once_lose_and_duplicate_nothing(store, live_server):
    """16 labelers x 25 answers, plus 4 browser tabs of one labeler racing for the same queued pairs."""
    server = live_server(store, min_response_ms=0)
    tokens = {f"lab{k}": store.add_labeler(f"lab{k}") for k in range(16)}
    tokens["shared"] = store.add_labeler("shared")
    outcomes, errors = [], []

    def label(name: str, limit: int):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        headers = {"Authorization": f"Bearer {tokens[name]}", "Content-Type": "application/json"}
        try:
            for _ in range(limit):
                conn.request("GET", "/api/next", headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if resp.status != 200:  # say what came back (a flake once gave an empty body under load)
                    raise AssertionError(f"GET /api/next: {resp.status} {data[:200]!r}")
                pair = json.loads(data)
                if pair["done"]:
                    return
                body = json.dumps({"left": pair["left"]["id"], "right": pair["right"]["id"], "choice": "left",
                                   "response_ms": 5})
                conn.request("POST", "/api/answer", body=body, headers=headers)
                r = conn.getresponse()
                r.read()
                outcomes.append((name, r.status))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(repr(err))
        finally:
            conn.close()

    threads = [threading.Thread(target=label, args=(name, 25)) for name in tokens if name != "shared"]
    threads += [threading.Thread(target=label, args=("shared", 60)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert {status for _, status in outcomes} <= {200, 409}
    saved = [(name, status) for name, status in outcomes if status == 200]
    rows = store.comparisons()
    assert len(rows) == len(saved) == 16 * 25 + 30
    assert len({(r["labeler"], frozenset((r["left"], r["right"]))) for r in rows}) == len(rows)
    for k in range(16):
        assert store.progress(f"lab{k}")["answered"] == 25
    assert store.progress("shared")["remaining"] == 0
