"""The labeling app answers only what it asked, and keeps serving under slow clients.

Answers: a table of answers the app did not ask for (never queued, never served, served to another
labeler, already answered, forgotten, too fast, too soon after the previous one) is refused with its
4xx and a one-line JSON error, and nothing is stored; the answers it did ask for are accepted. Stores
made before the `served` table existed open and serve. Connections: half-sent requests of every kind,
300 at once, do not keep a real request from being answered, and each is dropped at its deadline.
"""

import logging
import select
import socket
import sqlite3

import httpx
import pytest
from starlette.testclient import TestClient

from scoreaction.feedback.app import create_app
from scoreaction.feedback.server import Limits
from scoreaction.feedback.store import MAX_SERVED, PreferenceStore

pytest_plugins = ["feedback_fixtures"]  # store, make_store, live_server

LONG = 60_000  # a min_response_ms no test outlasts: answers refused for being quick are refused for certain


def backdate(store, seconds: float) -> None:
    """Move every serving time `seconds` into the past (as if the labeler had looked that long)."""
    con = sqlite3.connect(store.path)
    with con:
        con.execute("UPDATE served SET served = served - ?", (seconds,))
    con.close()


@pytest.fixture
def app_client(store):
    """make(min_response_ms) -> a TestClient of the app; .labelers[name] are the headers of labelers ann and bob."""
    clients = []
    auth = {name: {"Authorization": f"Bearer {store.add_labeler(name)}"} for name in ("ann", "bob")}

    def make(min_response_ms: float = 0):
        client = TestClient(create_app(store, seed=0, min_response_ms=min_response_ms)).__enter__()
        client.labelers = auth
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def next_pair(client, who: str = "ann") -> tuple[int, int]:
    r = client.get("/api/next", headers=client.labelers[who])
    assert r.status_code == 200 and not r.json()["done"], r.text
    return r.json()["left"]["id"], r.json()["right"]["id"]


def post(client, pair, who: str = "ann", choice: str = "left", **extra):
    return client.post("/api/answer", headers=client.labelers[who],
                       json={"left": pair[0], "right": pair[1], "choice": choice, **extra})


# Each case: (name, min_response_ms, setup(client, store) -> the pair to answer, status, error fragment).
# The store's queue is the first 30 of the 45 pairs of items 1..10: (1, 2), (1, 3), ... (4, 10).
def never_queued(client, store):
    return 9, 10


def queued_never_served(client, store):
    next_pair(client)  # serves (1, 2) only
    return 1, 3


def served_to_another(client, store):
    return next_pair(client, "bob")


def already_answered(client, store):
    pair = next_pair(client)
    assert post(client, pair).status_code == 200
    return pair


def already_answered_reversed(client, store):
    return already_answered(client, store)[::-1]


def answered_by_simulation(client, store):
    pair = next_pair(client)
    store.add_comparison(*pair, "tie", "ann")  # `feedback simulate` writes through the store, as ann
    return pair


def undone_by_another(client, store):
    pair = already_answered(client, store)
    client.post("/api/undo", headers=client.labelers["bob"])  # bob's undo touches only bob's answers
    return pair


def skipped(client, store):
    pair = next_pair(client)
    assert post(client, pair, choice="skip").status_code == 200  # a skip is an answer
    return pair


def undone_then_asked_of_another(client, store):
    pair = already_answered(client, store)
    client.post("/api/undo", headers=client.labelers["ann"])  # served again to ann, never to bob
    client.labelers = {**client.labelers, "ann": client.labelers["bob"]}  # the answer comes with bob's token
    return pair


def pushed_out_by_a_flood(client, store):
    store.clear_queue()  # random pairs: every GET /api/next serves another one
    first = next_pair(client)
    for _ in range(3 * MAX_SERVED):
        next_pair(client)
    con = sqlite3.connect(store.path)
    waiting = con.execute("SELECT low, high FROM served WHERE labeler = 'ann'").fetchall()
    con.close()
    assert len(waiting) == MAX_SERVED and tuple(sorted(first)) not in waiting  # forgotten
    return first


def served_just_now(client, store):
    return next_pair(client)


def too_soon_after_previous(client, store):
    first = next_pair(client)
    backdate(store, 2 * LONG / 1000)
    assert post(client, first).status_code == 200  # looked long enough
    pair = next_pair(client)
    backdate(store, 2 * LONG / 1000)  # so at the next pair, but the previous answer came just now
    return pair


def served_and_looked_at(client, store):
    pair = next_pair(client)
    backdate(store, 2 * LONG / 1000)
    return pair


def served_reversed(client, store):
    return next_pair(client)[::-1]  # the sides as shown do not matter, the pair does


def undone_then_again(client, store):
    pair = already_answered(client, store)
    undo = client.post("/api/undo", headers=client.labelers["ann"]).json()
    assert (undo["left"]["id"], undo["right"]["id"]) == pair  # shown again, so served again
    return pair


REFUSED = [
    ("never queued", 0, never_queued, 409, "not awaiting an answer from labeler 'ann'"),
    ("queued, never served", 0, queued_never_served, 409, "not awaiting an answer"),
    ("served to another labeler", 0, served_to_another, 409, "not awaiting an answer from labeler 'ann'"),
    ("already answered", 0, already_answered, 409, "already answered"),
    ("already answered, sides swapped", 0, already_answered_reversed, 409, "already answered"),
    ("answered by a simulation", 0, answered_by_simulation, 409, "already answered"),
    ("answered, another labeler undid", 0, undone_by_another, 409, "already answered"),
    ("skipped, then answered", 0, skipped, 409, "already answered"),
    ("undone by its labeler, answered by another", 0, undone_then_asked_of_another, 409,
     "not awaiting an answer from labeler 'bob'"),
    ("pushed out by a flood of GET /api/next", 0, pushed_out_by_a_flood, 409, "not awaiting an answer"),
    ("unknown item", 0, lambda client, store: (1, 999), 422, "unknown item id 999"),
    ("answered at once", LONG, served_just_now, 429, "ms after the pair was shown"),
    ("too soon after the previous answer", LONG, too_soon_after_previous, 429, "ms after the previous answer"),
]
ACCEPTED = [
    ("served, answered at once, no minimum", 0, served_just_now),
    ("served and looked at", LONG, served_and_looked_at),
    ("served, sides swapped", 0, served_reversed),
    ("answered, undone, answered again", 0, undone_then_again),
]


@pytest.mark.parametrize("name, min_ms, setup, status, message", REFUSED, ids=[c[0] for c in REFUSED])
def test_an_answer_the_app_did_not_ask_for_is_refused_and_nothing_stored(app_client, store, name, min_ms, setup,
                                                                         status, message):
    client = app_client(min_ms)
    pair = setup(client, store)
    before = store.comparisons()
    r = post(client, pair, choice="right")
    assert r.status_code == status, (name, r.text)
    error = r.json()["error"]
    assert message in error and "\n" not in error and len(error) < 300, error
    assert store.comparisons() == before
    if status == 429:  # the pair stays served: a later answer is accepted
        assert int(r.headers["retry-after"]) >= 1
        backdate(store, 2 * LONG / 1000)
        con = sqlite3.connect(store.path)
        with con:
            con.execute("UPDATE comparisons SET created = created - ?", (2 * LONG / 1000,))
        con.close()
        assert post(client, pair).status_code == 200 and len(store.comparisons()) == len(before) + 1


@pytest.mark.parametrize("name, min_ms, setup", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_an_answer_to_a_pair_the_app_served_is_accepted_once(app_client, store, name, min_ms, setup):
    client = app_client(min_ms)
    pair = setup(client, store)
    before = len(store.comparisons())
    r = post(client, pair, choice="right", response_ms=999_999)
    assert r.status_code == 200, (name, r.text)
    stored = store.comparisons()[-1]
    assert len(store.comparisons()) == before + 1 and (stored["left"], stored["right"]) == pair
    assert stored["response_ms"] == r.json()["response_ms"] < 999_999  # the server's measure, not the page's
    assert post(client, pair).status_code == 409 and len(store.comparisons()) == before + 1


def test_a_burst_of_answers_from_one_token_is_refused_beyond_the_first(make_store):
    """50 answers at once to pairs served long ago (several tabs, or a script): one token answers one
    pair per min_response_ms."""
    store = make_store(name="open.db", n_items=12)  # no queue: each GET /api/next serves a random pair
    with TestClient(create_app(store, seed=1, min_response_ms=LONG)) as client:
        client.labelers = {"ann": {"Authorization": f"Bearer {store.add_labeler('ann')}"}}
        pairs = list({frozenset(next_pair(client)) for _ in range(25)})
        backdate(store, 2 * LONG / 1000)
        statuses = [post(client, sorted(pair)).status_code for pair in (pairs * 50)[:50]]
    assert statuses[0] == 200 and 429 in statuses and set(statuses[1:]) <= {409, 429}, statuses
    assert store.count_comparisons() == 1


def test_a_labeler_has_at_most_max_served_pairs_awaiting_answers(make_store):
    store = make_store(name="open.db", n_items=20)
    pairs = [(a, b) for a in range(1, 21) for b in range(a + 1, 21)][:MAX_SERVED + 5]
    with TestClient(create_app(store, min_response_ms=0)) as client:
        client.labelers = {"ann": {"Authorization": f"Bearer {store.add_labeler('ann')}"}}
        for a, b in pairs:
            store.serve("ann", a, b)  # what GET /api/next does, in a known order
        assert [post(client, p).status_code for p in pairs[:5]] == [409] * 5  # the oldest five were forgotten
        assert [post(client, p).status_code for p in pairs[5:]] == [200] * MAX_SERVED
    assert store.count_comparisons() == MAX_SERVED


def test_a_store_made_before_the_served_table_opens_and_serves(make_store):
    store = make_store(name="old.db", n_items=6, n_queued=3)
    store.add_comparison(1, 2, "left", "sim")
    path = store.path
    store.close()
    con = sqlite3.connect(path)  # what the previous release created: the same tables without `served`
    with con:
        con.execute("DROP TABLE served")
    con.close()
    with PreferenceStore(path) as reopened:
        token = reopened.add_labeler("ann")
        with TestClient(create_app(reopened, min_response_ms=0)) as client:
            headers = {"Authorization": f"Bearer {token}"}
            pair = client.get("/api/next", headers=headers).json()
            r = client.post("/api/answer", headers=headers,
                            json={"left": pair["left"]["id"], "right": pair["right"]["id"], "choice": "tie"})
            assert r.status_code == 200, r.text
        assert [(c["labeler"], c["choice"]) for c in reopened.comparisons()] == [("sim", "left"), ("ann", "tie")]
        assert reopened.backup(path.with_name("copy.db"))["comparisons"] == 2
    con = sqlite3.connect(path)
    assert con.execute("SELECT value FROM meta WHERE key = 'version'").fetchone() == ("1",)  # older code reads it
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    con.close()


# --- slow clients --------------------------------------------------------------------------------------
AUTH = b"Authorization: Bearer {token}\r\n"
HALF_SENT = [  # (name, bytes sent before the client stalls, whether a request head was sent)
    ("nothing", b"", False),
    ("half a request line", b"GET /api/pro", False),
    ("headers without their end", b"GET /api/progress HTTP/1.1\r\nHost: x\r\n" + AUTH, False),
    ("half a body", b"POST /api/answer HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Type: application/json\r\n"
                    b"Content-Length: 60\r\n\r\n{\"left\": 1, ", True),
    ("a chunked body never ended", b"POST /api/answer HTTP/1.1\r\nHost: x\r\n" + AUTH
                                   + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                                     b"b\r\n{\"left\": 1,\r\n", True),
]


def open_half_sent(port: int, data: bytes, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        socks.append(s)
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # already closed to make room for newer ones
    return socks


def read_to_end(s: socket.socket) -> bytes:
    """What the server sends until it closes the connection (a reset counts as closed); 10 s at most."""
    s.settimeout(10)
    got = b""
    try:
        while chunk := s.recv(4096):
            got += chunk
    except ConnectionResetError:
        pass
    return got


@pytest.fixture
def uvicorn_errors():
    """What uvicorn logs as errors (an exception in the app would show here)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


@pytest.mark.parametrize("max_connections", [64, 512], ids=["300 over a cap of 64", "300 under the cap"])
@pytest.mark.parametrize("name, data, _", HALF_SENT, ids=[c[0] for c in HALF_SENT])
def test_300_half_sent_requests_do_not_keep_a_real_one_from_being_answered(store, live_server, uvicorn_errors,
                                                                           max_connections, name, data, _):
    token = store.add_labeler("ann")
    server = live_server(store, Limits(header_timeout=60, body_timeout=60, max_connections=max_connections))
    socks = open_half_sent(server.port, data.replace(b"{token}", token.encode()), 300)
    try:
        for _ in range(3):  # a real labeler, on a new connection each time
            r = httpx.get(f"{server.url}/api/progress", headers={"Authorization": f"Bearer {token}"}, timeout=10)
            assert r.status_code == 200 and r.json()["labeler"] == "ann", r.text
        dropped = select.select(socks, [], [], 1)[0]  # closed by the server (readable: at their end)
        assert len(dropped) >= 300 - max_connections if max_connections < 300 else not dropped, len(dropped)
    finally:
        for s in socks:
            s.close()
    assert store.count_comparisons() == 0 and not uvicorn_errors


@pytest.mark.parametrize("name, data, has_head", HALF_SENT, ids=[c[0] for c in HALF_SENT])
def test_a_request_not_finished_in_time_is_dropped(store, live_server, uvicorn_errors, name, data, has_head):
    token = store.add_labeler("ann")
    server = live_server(store, Limits(header_timeout=0.3, body_timeout=0.3))
    socks = open_half_sent(server.port, data.replace(b"{token}", token.encode()), 20)
    replies = [read_to_end(s) for s in socks]  # each ends: the server closes it
    for s in socks:
        s.close()
    if has_head:  # a request was read: it is answered 408
        assert all(r.startswith(b"HTTP/1.1 408 ") and b'"the request body was not received within 0.3 s"' in r
                   for r in replies), replies[0]
    else:  # no request was read: closed without a word
        assert replies == [b""] * 20
    assert store.count_comparisons() == 0 and not uvicorn_errors
    r = httpx.get(f"{server.url}/api/progress", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 200  # still serving


def test_a_trickled_request_head_is_dropped_at_its_deadline(store, live_server):
    """One byte every 20 ms never completes the head: the deadline counts from the first byte."""
    server = live_server(store, Limits(header_timeout=0.3))
    head = b"GET /api/progress HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 300 + b"\r\n\r\n"
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sent, closed = 0, False
    try:
        for byte in head[:-4]:  # never the blank line that ends the head
            s.sendall(bytes([byte]))
            sent += 1
            if select.select([s], [], [], 0.02)[0]:
                closed = s.recv(1) == b""
                break
    except (BrokenPipeError, ConnectionResetError):
        closed = True
    finally:
        s.close()
    assert closed and sent < len(head) - 4  # dropped long before the whole head (~6 s) was trickled
