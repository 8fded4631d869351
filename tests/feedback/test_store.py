"""The preference store: exact arrays, dedupe, answers, queue, tokens, JSONL round trip, bad files,
and writers in many threads and processes at once."""

import base64
import io
import json
import multiprocessing
import sqlite3
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from scoreaction.feedback.store import AlreadyAnswered, PreferenceStore, UnknownItem

pytest_plugins = ["feedback_fixtures"]  # store, make_store, live_server

SAMPLES = [
    np.array([0.1, -2.5], dtype=np.float32),
    np.arange(12, dtype=np.float64).reshape(3, 4) / 7,
    np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8),
    np.array([[1, -2], [3, 4]], dtype=np.int64),
    np.array([True, False, True]),
    np.float32(np.nan) * np.ones((1, 4, 4), dtype=np.float32),  # NaN survives bit for bit too
]


def test_items_round_trip_exactly_and_dedupe_by_content(tmp_path):
    store = PreferenceStore(tmp_path / "p.db", create=True)
    ids = [store.add_item(a, task="t", model="m") for a in SAMPLES]
    assert ids == list(range(1, len(SAMPLES) + 1))
    for item_id, a in zip(ids, SAMPLES):
        back = store.item_array(item_id)
        assert back.dtype == a.dtype and back.shape == a.shape
        assert back.tobytes() == a.tobytes()
        meta = store.item(item_id)
        assert meta["task"] == "t" and meta["model"] == "m" and meta["shape"] == a.shape and len(meta["sha256"]) == 64
    # the same content again: the same id, whatever the container (list, tensor)
    assert store.add_item(SAMPLES[0].copy(), task="t") == ids[0]
    assert store.add_item(torch.tensor([0.1, -2.5]), task="t") == ids[0]
    assert store.add_item(SAMPLES[1].tolist(), task="t") == ids[1]
    # another task or condition, or another dtype, is another item
    assert store.add_item(SAMPLES[0], task="other") not in ids
    assert store.add_item(SAMPLES[0], task="t", condition=3) not in ids
    assert store.add_item(SAMPLES[0].astype(np.float64), task="t") not in ids
    assert len(store.items()) == len(SAMPLES) + 3
    assert [m["id"] for m in store.items(task="t", condition=3)] == [len(SAMPLES) + 2]


def test_png_items_are_their_pixels(tmp_path):
    store = PreferenceStore(tmp_path / "p.db", create=True)
    pixels = np.random.default_rng(1).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    item_id = store.add_png(buf.getvalue(), task="pictures")
    assert np.array_equal(store.item_array(item_id), pixels)
    (tmp_path / "a.png").write_bytes(buf.getvalue())
    assert store.add_png(tmp_path / "a.png", task="pictures") == item_id


@pytest.mark.parametrize("kwargs, message", [
    ({"sample": np.array(["a", "b"]), "task": "t"}, "array of numbers"),
    ({"sample": np.array([1.0]), "task": "t", "condition": 1.5}, "condition"),
    ({"sample": np.array([1.0]), "task": "t", "condition": True}, "condition"),
    ({"sample": np.array([1.0]), "task": "../etc"}, "task name"),
])
def test_bad_items_are_refused(tmp_path, kwargs, message):
    store = PreferenceStore(tmp_path / "p.db", create=True)
    with pytest.raises(ValueError, match=message):
        store.add_item(kwargs.pop("sample"), **kwargs)
    assert store.items() == []


def test_a_missing_store_is_an_error_and_is_not_created(tmp_path):
    path = tmp_path / "missing.db"
    with pytest.raises(ValueError, match="missing.db.*does not exist"):
        PreferenceStore(path)
    assert not path.exists()
    with pytest.raises(ValueError, match="folder"):
        PreferenceStore(tmp_path / "no" / "such" / "p.db", create=True)


@pytest.mark.parametrize("content", [b"garbage bytes, not a database" * 40, b"", b"SQLite format 3\x00" + b"\x17" * 900])
def test_a_corrupt_store_is_a_clear_error(tmp_path, content):
    path = tmp_path / "corrupt.db"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="corrupt.db"):
        PreferenceStore(path)
    with pytest.raises(ValueError, match="corrupt.db"):
        PreferenceStore(path, create=True)  # create never replaces a file
    assert path.read_bytes() == content


def test_a_foreign_database_or_a_folder_is_not_a_store(tmp_path):
    con = sqlite3.connect(tmp_path / "other.db")
    con.execute("CREATE TABLE meta (key TEXT, value TEXT)")
    con.commit()
    con.close()
    with pytest.raises(ValueError, match="other.db.*not a preference store"):
        PreferenceStore(tmp_path / "other.db")
    with pytest.raises(ValueError, match="not a file"):
        PreferenceStore(tmp_path)


def test_a_truncated_store_fails_loudly(make_store):
    store = make_store(n_items=400)
    store.close()  # folds the WAL into the file
    data = store.path.read_bytes()
    store.path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="prefs.db"):
        PreferenceStore(store.path).item_arrays(range(1, 401))


def test_answers_dataset_and_undo(make_store):
    store = make_store(n_items=4)
    store.add_comparison(1, 2, "left", "ann", 812.5)
    store.add_comparison(3, 4, "right", "ann")
    store.add_comparison(1, 3, "tie", "bob")
    store.add_comparison(2, 4, "skip", "bob")
    rows = store.comparisons()
    assert [(r["left"], r["right"], r["choice"], r["labeler"]) for r in rows] == [
        (1, 2, "left", "ann"), (3, 4, "right", "ann"), (1, 3, "tie", "bob"), (2, 4, "skip", "bob")]
    assert rows[0]["response_ms"] == 812.5 and rows[1]["response_ms"] is None
    data = store.dataset()
    assert data.choice.tolist() == [1.0, 0.0, 0.5]  # 'skip' carries no label
    x = store.item_arrays([1, 2, 3, 4])
    assert torch.equal(data.left[0], torch.as_tensor(x[0])) and torch.equal(data.right[1], torch.as_tensor(x[3]))
    assert data.cond is None and data.left.dtype == torch.float32
    assert len(store.dataset(labeler="bob")) == 1

    removed = store.undo_last("ann")
    assert (removed["left"], removed["right"], removed["choice"]) == (3, 4, "right")
    assert [r["choice"] for r in store.comparisons(labeler="ann")] == ["left"]
    assert store.undo_last("ann") and store.undo_last("ann") is None
    assert len(store.comparisons(labeler="bob")) == 2


def test_class_conditions_become_cond_and_tasks_must_not_mix(tmp_path):
    store = PreferenceStore(tmp_path / "p.db", create=True)
    a, b = store.add_items([[0.0, 1.0], [1.0, 0.0]], task="t", conditions=[7, 7])
    c = store.add_item([2.0, 2.0], task="t", condition=5)
    d, e = store.add_items([[0.0], [1.0]], task="u")
    store.add_comparison(a, b, "right", "ann")
    with pytest.raises(ValueError, match="different tasks or conditions"):
        store.add_comparison(a, c, "left", "ann")
    store.add_comparison(d, e, "left", "ann")
    with pytest.raises(ValueError, match="several tasks"):
        store.dataset()
    data = store.dataset(task="t")
    assert data.cond.tolist() == [7] and data.cond.dtype == torch.long


@pytest.mark.parametrize("args, error", [
    ((1, 1, "left", "ann"), "two different items"),
    ((1, 99, "left", "ann"), "unknown item id 99"),
    ((1, 2, "LEFT", "ann"), "choice must be one of"),
    ((1, 2, "left", ""), "labeler name"),
    ((1, 2, "left", "ann", -5), "response_ms"),
    ((1, 2, "left", "ann", float("nan")), "response_ms"),
    ((1.0, 2, "left", "ann"), "item id must be an integer"),
])
def test_bad_answers_write_nothing(make_store, args, error):
    store = make_store(n_items=3)
    with pytest.raises(ValueError, match=error) as exc:
        store.add_comparison(*args)
    if "unknown" in error:
        assert isinstance(exc.value, UnknownItem)
    assert store.count_comparisons() == 0


def test_once_refuses_a_second_answer_to_a_pair(make_store):
    store = make_store(n_items=3)
    store.add_comparison(1, 2, "left", "ann", once=True)
    with pytest.raises(AlreadyAnswered):
        store.add_comparison(2, 1, "right", "ann", once=True)
    store.add_comparison(1, 2, "left", "bob", once=True)
    store.add_comparison(1, 2, "right", "ann")  # without once: a repeated question is allowed
    assert store.count_comparisons() == 3


def test_next_pair_serves_the_queue_in_order_then_stops(make_store):
    store = make_store(n_items=5)
    store.enqueue_pairs([(1, 2), (3, 4), (2, 5)])
    assert store.enqueue_pairs([(1, 2)]) == 0  # already queued
    assert store.next_pair("ann") == (1, 2)
    store.add_comparison(2, 1, "left", "ann")  # either orientation answers the pair
    assert store.next_pair("ann") == (3, 4) and store.next_pair("bob") == (1, 2)
    store.add_comparison(3, 4, "skip", "ann")
    store.add_comparison(2, 5, "tie", "ann")
    assert store.next_pair("ann") is None
    assert store.progress("ann") == {"labeler": "ann", "answered": 3, "queued": 3, "remaining": 0}
    assert store.progress("bob")["remaining"] == 3


def test_random_pairs_cover_every_pair_once_within_a_condition(tmp_path):
    store = PreferenceStore(tmp_path / "p.db", create=True)
    store.add_items(np.eye(4), task="t", conditions=[0, 0, 0, 1])  # allowed pairs: (1,2) (1,3) (2,3)
    store.add_items(np.eye(3), task="u")  # (5,6) (5,7) (6,7)
    seen = set()
    import random
    rng = random.Random(0)
    while (pair := store.next_pair("ann", rng=rng)) is not None:
        key = frozenset(pair)
        assert key not in seen
        seen.add(key)
        store.add_comparison(*pair, "left", "ann")
    assert seen == {frozenset(p) for p in [(1, 2), (1, 3), (2, 3), (5, 6), (5, 7), (6, 7)]}
    assert store.progress("ann")["queued"] is None


def test_labeler_tokens_are_stored_only_as_hashes(make_store):
    store = make_store(n_items=2)
    token = store.add_labeler("ann")
    assert store.labeler_for_token(token) == "ann"
    assert store.labeler_for_token(token + "x") is None and store.labeler_for_token("") is None
    with pytest.raises(ValueError, match="already exists"):
        store.add_labeler("ann")
    new = store.add_labeler("ann", replace=True)
    assert store.labeler_for_token(token) is None and store.labeler_for_token(new) == "ann"
    for path in store.path.parent.glob("prefs.db*"):
        assert new.encode() not in path.read_bytes()
    with pytest.raises(ValueError, match="labeler name"):
        store.add_labeler("ann smith")


def filled_store(tmp_path, name="a.db"):
    store = PreferenceStore(tmp_path / name, create=True)
    ids = [store.add_item(a, task="t", model="m") for a in SAMPLES[:1] + [np.array([3.0, -1e-30], np.float32)]]
    ids += store.add_items(SAMPLES[2:3] * 1 + [SAMPLES[2][::-1].copy()], task="pics", conditions=[4, 4])
    ids.append(store.add_item(SAMPLES[1], task="txt", condition="a red cube"))
    ids.append(store.add_item(SAMPLES[1] + 1, task="txt", condition="a red cube"))
    store.add_comparison(ids[0], ids[1], "left", "ann", 1234.567)
    store.add_comparison(ids[2], ids[3], "tie", "ann")
    store.add_comparison(ids[5], ids[4], "skip", "bob", 0.1)
    store.enqueue_pairs([(ids[1], ids[0]), (ids[4], ids[5])])
    store.add_labeler("ann")
    return store


def test_jsonl_export_import_round_trip_is_exact_and_idempotent(tmp_path):
    a = filled_store(tmp_path)
    a.export_jsonl(tmp_path / "a.jsonl")
    b = PreferenceStore(tmp_path / "b.db", create=True)
    counts = b.import_jsonl(tmp_path / "a.jsonl")
    assert counts == {"items_added": 6, "items_existing": 0, "comparisons_added": 3, "comparisons_existing": 0,
                      "queue_added": 2}
    assert b.items() == a.items() and b.comparisons() == a.comparisons() and b.queue() == a.queue()
    for m in a.items():
        x, y = a.item_array(m["id"]), b.item_array(m["id"])
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
    b.export_jsonl(tmp_path / "b.jsonl")
    assert (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()
    assert b.labelers() == []  # tokens never leave the store
    again = b.import_jsonl(tmp_path / "a.jsonl")
    assert again["items_added"] == again["comparisons_added"] == again["queue_added"] == 0
    assert b.count_comparisons() == 3


def test_import_into_a_store_with_other_items_remaps_ids(tmp_path):
    a = filled_store(tmp_path)
    a.export_jsonl(tmp_path / "a.jsonl")
    b = PreferenceStore(tmp_path / "b.db", create=True)
    b.add_items(np.ones((3, 5)) * np.arange(3)[:, None], task="zzz")
    b.import_jsonl(tmp_path / "a.jsonl")
    by_sha = {m["sha256"]: m["id"] for m in b.items()}
    old_sha = {m["id"]: m["sha256"] for m in a.items()}
    assert [(by_sha[old_sha[c["left"]]], by_sha[old_sha[c["right"]]], c["choice"]) for c in a.comparisons()] == \
        [(c["left"], c["right"], c["choice"]) for c in b.comparisons()]


def test_a_bad_import_names_the_line_and_writes_nothing(tmp_path):
    a = filled_store(tmp_path)
    a.export_jsonl(tmp_path / "a.jsonl")
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    item = json.loads(lines[1])
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    pickled = dict(item, npy=base64.b64encode(buf.getvalue()).decode())
    import hashlib
    pickled["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    comparison_line = next(k for k, line in enumerate(lines) if '"comparison"' in line)
    cases = {
        "not valid JSON": {3: "{oops"},
        "does not match its sha256": {1: json.dumps(dict(item, sha256="0" * 64))},
        "holds Python objects": {1: json.dumps(pickled)},  # never unpickled
        "choice must be one of": {comparison_line: lines[comparison_line].replace('"choice": "left"', '"choice": "maybe"')},
        "header": {0: json.dumps({"format": "something-else"})},
    }
    b = PreferenceStore(tmp_path / "b.db", create=True)
    for message, edits in cases.items():
        bad = [edits.get(k, line) for k, line in enumerate(lines)]
        (tmp_path / "bad.jsonl").write_text("\n".join(bad) + "\n")
        with pytest.raises(ValueError, match="bad.jsonl") as exc:
            b.import_jsonl(tmp_path / "bad.jsonl")
        assert message in str(exc.value), str(exc.value)
        assert b.items() == [] and b.count_comparisons() == 0


def test_threads_writing_at_once_lose_nothing(make_store):
    store = make_store(n_items=10)
    pairs = [(a, b) for a in range(1, 11) for b in range(a + 1, 11)]

    def label(k):
        for left, right in pairs[:25]:
            store.add_comparison(left, right, "left", f"t{k}", once=True)

    threads = [threading.Thread(target=label, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = store.comparisons()
    assert len(rows) == 8 * 25 and len({r["uid"] for r in rows}) == len(rows)
    assert len({(r["labeler"], r["left"], r["right"]) for r in rows}) == len(rows)


def write_from_process(path: str, k: int, n: int) -> None:
    store = PreferenceStore(path)
    for i in range(n):
        store.add_comparison(1 + i % 5, 6, "right", f"proc{k}")


def test_processes_writing_at_once_lose_nothing(make_store):
    store = make_store(n_items=6)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=write_from_process, args=(str(store.path), k, 40)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    stats = store.stats()["comparisons"]
    assert sorted(stats) == [f"proc{k}" for k in range(4)] and all(s["right"] == 40 for s in stats.values())


def test_close_leaves_one_file_and_the_store_reopens(make_store):
    store = make_store(n_items=20)
    threads = [threading.Thread(target=store.add_comparison, args=(1, k, "left", f"t{k}")) for k in range(2, 8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.path.with_name("prefs.db-wal").exists()  # WAL mode
    store.close()
    assert sorted(p.name for p in store.path.parent.iterdir()) == ["prefs.db"]  # WAL folded back in
    assert store.count_comparisons() == 6  # usable again: new connections
    store.close()
    assert sorted(p.name for p in store.path.parent.iterdir()) == ["prefs.db"]


def test_each_thread_has_one_connection_and_ended_threads_free_theirs(make_store):
    store = make_store(n_items=3)
    for k in range(30):  # 30 short-lived threads, like a server's worker pool over a day
        t = threading.Thread(target=store.add_comparison, args=(1, 2, "left", f"t{k}"))
        t.start()
        t.join()
    assert len(store._db._opened) <= 2  # this thread's and the last worker's
    seen = []

    def two_reads():
        with store._tx() as a:
            pass
        with store._tx() as b:
            seen.append(a is b)

    t = threading.Thread(target=two_reads)
    t.start()
    t.join()
    assert seen == [True] and store.count_comparisons() == 30


def write_with_inherited_store(store: PreferenceStore, k: int, n: int) -> None:
    for i in range(n):
        store.add_comparison(1 + i % 5, 6, "left", f"child{k}")


def test_a_forked_child_opens_its_own_connections(make_store):
    store = make_store(n_items=6)
    store.add_comparison(1, 2, "tie", "parent")  # the parent has a connection open when it forks
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=write_with_inherited_store, args=(store, k, 30)) for k in range(3)]
    for p in procs:
        p.start()
    store.add_comparison(3, 4, "tie", "parent")  # the parent keeps writing meanwhile
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    stats = store.stats()["comparisons"]
    assert {name: s["answers"] for name, s in stats.items()} == {"parent": 2, "child0": 30, "child1": 30, "child2": 30}
    assert store.count_comparisons() == 92
