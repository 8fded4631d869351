"""The preference store: samples shown to labelers and their pairwise answers, in one SQLite file.

One file holds everything (WAL journal, so readers never block the writer):

    meta(key, value)                        format = scoreaction-preferences, version = 1
    items(id, task, condition, model, sha256, dtype, shape, data, created)
        data       the sample's .npy bytes (np.save, allow_pickle=False): arrays of any shape and
                   numeric dtype, exact; a PNG picture is stored as its decoded uint8 (H, W, C) array
        condition  JSON text: null, a class label (int) or a prompt (str)
        sha256     of the .npy bytes; (task, condition, sha256) is unique, so adding the same
                   sample again returns the id it already has
    comparisons(id, uid, left, right, choice, labeler, created, response_ms)
        choice     'left', 'right', 'tie' or 'skip'; uid is random and makes imports idempotent
    queue(id, left, right)                  pairs the operator asked for, served in this order
    labelers(name, token_sha256, created)   only the SHA-256 of a labeler's token is kept
    served(labeler, low, high, served)      pairs the app shows a labeler and awaits an answer to
        low, high  the pair's item ids in increasing order; served is Unix time (first shown), at
                   most MAX_SERVED per labeler. Made by `serve`, consumed by `answer_served`; added
                   after version 1 was released (database.ADDED_TABLES): older stores get it on open

Every write is one `BEGIN IMMEDIATE` transaction (with a busy timeout and synchronous = FULL), so
threads and processes labelling at once never lose or interleave an answer, and a committed answer
survives a crash or a power cut. A store is created only on request (`PreferenceStore(path,
create=True)`, `scoreaction feedback init`); opening a missing, corrupt or foreign file is a StoreError
naming the file. `close()` (or leaving a `with PreferenceStore(...)` block) folds the WAL back into the
file, so that a store at rest is one file; `backup(dest)` copies it while it is in use.

Beside this module: database.py (the file, its connections and transactions), records.py (checked
values: arrays as .npy, names, answers), store_io.py (JSONL export/import, the torch dataset).
Clock: none; `created` is Unix time in seconds, `response_ms` the labeler's time to answer.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import secrets
import time
from pathlib import Path

import numpy as np

from scoreaction.errors import ScoreactionError
from scoreaction.feedback import records, store_io
from scoreaction.feedback.database import FORMAT, VERSION, Database, StoreError
from scoreaction.feedback.records import CHOICES, check_comparison, check_condition, check_name, npy_load, token_hash

__all__ = ["CHOICES", "FORMAT", "VERSION", "AlreadyAnswered", "NotServed", "PreferenceStore", "StoreError", "TooFast",
           "UnknownItem"]
_item_id = records.as_item_id
MAX_SERVED = 32  # pairs awaiting one labeler's answer at once (several tabs); the oldest is forgotten beyond
MIN_RESPONSE_MS = 200.0  # the labeling app's default quickest answer: below a person's visual reaction time


class UnknownItem(ScoreactionError):
    """An item id that the store does not hold."""


class AlreadyAnswered(ScoreactionError):
    """This labeler has already answered this pair (raised only when asked to check: `once=True`)."""


class NotServed(ScoreactionError):
    """An answer to a pair that is not awaiting this labeler's answer (never shown to them, or forgotten)."""


class TooFast(ScoreactionError):
    """An answer sooner than the minimum response time; `wait_ms` is how much longer it takes to be accepted."""

    def __init__(self, message: str, wait_ms: float):
        super().__init__(message)
        self.wait_ms = wait_ms


class PreferenceStore:
    """Items and pairwise comparisons in one SQLite file; see the module docstring for the layout."""

    def __init__(self, path: str | os.PathLike, *, create: bool = False):
        self.path = Path(path)
        self._db = Database(self.path, create=create)
        self._tx = self._db.transaction

    def __repr__(self) -> str:
        return f"PreferenceStore({str(self.path)!r})"

    def __enter__(self) -> "PreferenceStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def backup(self, dest: str | os.PathLike, *, overwrite: bool = False) -> dict:
        """A consistent copy of the store in the new file `dest`, made while others may write (SQLite's
        online backup API), checked and never over an existing file unless `overwrite`; returns its row counts."""
        return self._db.backup(dest, overwrite=overwrite)

    def close(self) -> None:
        """Close the connections this store opened in this process, folding the WAL back into the file
        first, so the store is one file again. Call it when no other thread is using the store; using it
        afterwards opens new connections."""
        self._db.close()

    # --- items -------------------------------------------------------------------------------------
    def add_items(self, samples, *, task: str, conditions=None, model: str = "") -> list[int]:
        """Add samples (a sequence, or an array/tensor whose first axis indexes samples) in one
        transaction; returns their ids. A sample already stored for the same task and condition
        keeps its id."""
        check_name(task, "task")
        if not isinstance(model, str) or len(model) > 500:
            raise ScoreactionError(f"model must be a string of at most 500 characters, found {model!r}")
        arrays = [records.as_array(s) for s in samples]
        conditions = [None] * len(arrays) if conditions is None else [check_condition(c) for c in conditions]
        if len(conditions) != len(arrays):
            raise ScoreactionError(f"got {len(arrays)} samples but {len(conditions)} conditions")
        with self._tx(write=True) as con:
            now = time.time()
            return [self._insert_item(con, a, task, c, model, now)[0] for a, c in zip(arrays, conditions)]

    @staticmethod
    def _insert_item(con, array: np.ndarray, task: str, condition, model: str, created: float) -> tuple[int, bool]:
        """(id, whether it is new) of one checked sample, inside a write transaction."""
        data = records.npy_bytes(array)
        key = (task, json.dumps(condition), hashlib.sha256(data).hexdigest())
        found = con.execute("SELECT id FROM items WHERE task = ? AND condition = ? AND sha256 = ?", key).fetchone()
        if found:
            return found[0], False
        return con.execute("INSERT INTO items (task, condition, sha256, model, dtype, shape, data, created) VALUES "
                           "(?, ?, ?, ?, ?, ?, ?, ?)", (*key, model, array.dtype.str, json.dumps(list(array.shape)),
                                                        data, created)).lastrowid, True

    def add_item(self, sample, *, task: str, condition=None, model: str = "") -> int:
        """Add one sample (array, tensor or nested lists); returns its id (the existing one if stored)."""
        return self.add_items([sample], task=task, conditions=[condition], model=model)[0]

    def add_png(self, png: bytes | str | os.PathLike, *, task: str, condition=None, model: str = "") -> int:
        """Add a PNG picture (bytes or a file) as its uint8 (H, W, C) array."""
        return self.add_item(records.png_array(png), task=task, condition=condition, model=model)

    _ITEM_COLUMNS = "id, task, condition, model, sha256, dtype, shape, created"

    @staticmethod
    def _item_dict(row) -> dict:
        return {"id": row[0], "task": row[1], "condition": json.loads(row[2]), "model": row[3], "sha256": row[4],
                "dtype": row[5], "shape": tuple(json.loads(row[6])), "created": row[7]}

    def item(self, item_id: int) -> dict:
        """Metadata of one item: id, task, condition, model, sha256, dtype, shape, created."""
        with self._tx() as con:
            row = con.execute(f"SELECT {self._ITEM_COLUMNS} FROM items WHERE id = ?", (_item_id(item_id),)).fetchone()
        if row is None:
            raise UnknownItem(f"unknown item id {item_id!r}")
        return self._item_dict(row)

    def item_array(self, item_id: int) -> np.ndarray:
        """The stored sample, exactly as it was added."""
        return self.item_arrays([item_id])[0]

    def item_arrays(self, ids) -> list[np.ndarray]:
        """The stored samples of these ids, in this order."""
        ids = [_item_id(i) for i in ids]
        wanted, data = sorted(set(ids)), {}
        with self._tx() as con:
            for start in range(0, len(wanted), 500):  # SQLite caps the number of parameters of a query
                chunk = wanted[start:start + 500]
                data.update(con.execute(f"SELECT id, data FROM items WHERE id IN ({','.join('?' * len(chunk))})",
                                        chunk).fetchall())
        missing = [i for i in ids if i not in data]
        if missing:
            raise UnknownItem(f"unknown item id {missing[0]!r}")
        return [npy_load(data[i]) for i in ids]

    def items(self, task: str | None = None, condition=..., model: str | None = None) -> list[dict]:
        """Metadata of the stored items, oldest first; filter by task, condition and model if given."""
        where, args = [], []
        if task is not None:
            where.append("task = ?"), args.append(task)
        if condition is not ...:
            where.append("condition = ?"), args.append(json.dumps(check_condition(condition)))
        if model is not None:
            where.append("model = ?"), args.append(model)
        sql = f"SELECT {self._ITEM_COLUMNS} FROM items" + (f" WHERE {' AND '.join(where)}" if where else "")
        with self._tx() as con:
            return [self._item_dict(row) for row in con.execute(sql + " ORDER BY id", args)]

    def tasks(self) -> list[str]:
        with self._tx() as con:
            return [row[0] for row in con.execute("SELECT DISTINCT task FROM items ORDER BY task")]

    # --- comparisons -------------------------------------------------------------------------------
    def _check_pair(self, con, left, right) -> None:
        left, right = _item_id(left), _item_id(right)
        if left == right:
            raise ScoreactionError(f"a comparison needs two different items, found {left} twice")
        rows = dict(con.execute("SELECT id, task || char(0) || condition FROM items WHERE id IN (?, ?)",
                                (left, right)).fetchall())
        for i in (left, right):
            if i not in rows:
                raise UnknownItem(f"unknown item id {i}")
        if rows[left] != rows[right]:
            raise ScoreactionError(f"items {left} and {right} belong to different tasks or conditions "
                                   f"and cannot be compared")

    def add_comparisons(self, rows, *, once: bool = False, skip_answered: bool = False) -> list[int | None]:
        """Add answers in one transaction. Each row is a dict with left, right, choice, labeler and
        optionally response_ms, created (Unix seconds) and uid. With once=True a labeler may answer a
        pair (in either order) only once: a second answer raises AlreadyAnswered and nothing is written.
        With skip_answered=True such a row is left out instead (its id is None), the others are added. The
        check and the insert are one write transaction, so two processes answering for one labeler at once
        never answer a pair twice."""
        checked = [check_comparison(row) for row in rows]
        with self._tx(write=True) as con:
            return self._insert_comparisons(con, checked, once, skip_answered)

    def _insert_comparisons(self, con, checked: list[tuple], once: bool = False,
                            skip_answered: bool = False) -> list[int | None]:
        ids = []
        for uid, left, right, choice, labeler, created, response_ms in checked:
            self._check_pair(con, left, right)
            if (once or skip_answered) and con.execute(
                    "SELECT 1 FROM comparisons WHERE labeler = ? AND ((left = ? AND right = ?) OR "
                    "(left = ? AND right = ?))", (labeler, left, right, right, left)).fetchone():
                if skip_answered:
                    ids.append(None)
                    continue
                raise AlreadyAnswered(f"labeler {labeler!r} has already answered the pair ({left}, {right})")
            ids.append(con.execute("INSERT INTO comparisons (uid, left, right, choice, labeler, created, response_ms) "
                                   "VALUES (?, ?, ?, ?, ?, ?, ?)",
                                   (uid, left, right, choice, labeler, created, response_ms)).lastrowid)
        return ids

    def add_comparison(self, left: int, right: int, choice: str, labeler: str, response_ms: float | None = None,
                       *, once: bool = False) -> int:
        """Record one answer: `choice` says which of the items shown left and right was preferred."""
        return self.add_comparisons([{"left": left, "right": right, "choice": choice, "labeler": labeler,
                                      "response_ms": response_ms}], once=once)[0]

    def undo_last(self, labeler: str, *, serve_again: bool = False) -> dict | None:
        """Delete this labeler's latest answer; returns it (a dict), or None if there was none. With
        serve_again=True its pair awaits this labeler's answer again, served from now (the app shows it)."""
        with self._tx(write=True) as con:
            row = con.execute(f"SELECT {self._COMPARISON_COLUMNS} FROM comparisons WHERE labeler = ? "
                              "ORDER BY id DESC LIMIT 1", (labeler,)).fetchone()
            if row is None:
                return None
            con.execute("DELETE FROM comparisons WHERE id = ?", (row[0],))
            if serve_again:
                self._serve(con, labeler, row[2], row[3], time.time(), replace=True)
        return self._comparison_dict(row)

    # --- what the app shows, and the answers it accepts ---------------------------------------------
    def serve(self, labeler: str, left: int, right: int) -> None:
        """Record that the app shows this pair (either order) to this labeler and awaits an answer. A
        pair shown again (another tab, a reload) keeps the time it was first shown; beyond MAX_SERVED
        pairs awaiting this labeler, the oldest is forgotten."""
        check_name(labeler)
        left, right = _item_id(left), _item_id(right)
        with self._tx(write=True) as con:
            self._check_pair(con, left, right)
            self._serve(con, labeler, left, right, time.time())

    @staticmethod
    def _serve(con, labeler: str, left: int, right: int, now: float, replace: bool = False) -> None:
        con.execute(f"INSERT OR {'REPLACE' if replace else 'IGNORE'} INTO served (labeler, low, high, served) "
                    "VALUES (?, ?, ?, ?)", (labeler, min(left, right), max(left, right), now))
        con.execute("DELETE FROM served WHERE labeler = ? AND rowid NOT IN (SELECT rowid FROM served "
                    "WHERE labeler = ? ORDER BY served DESC, rowid DESC LIMIT ?)", (labeler, labeler, MAX_SERVED))

    def answer_served(self, left: int, right: int, choice: str, labeler: str, *,
                      min_response_ms: float = 0.0) -> tuple[int, float]:
        """Record the answer to a pair served to this labeler (`serve`) and not yet answered by them;
        returns (comparison id, response_ms). response_ms is measured here, from when the pair was
        served. Refused, with nothing written: AlreadyAnswered; NotServed (never served to this
        labeler, or forgotten); TooFast when the answer comes sooner than `min_response_ms` after the
        pair was served or after this labeler's previous answer (one person answers one pair at a time)."""
        uid, left, right, choice, labeler, _, _ = check_comparison(
            {"left": left, "right": right, "choice": choice, "labeler": labeler})
        with self._tx(write=True) as con:
            self._check_pair(con, left, right)
            if con.execute("SELECT 1 FROM comparisons WHERE labeler = ? AND ((left = ? AND right = ?) OR "
                           "(left = ? AND right = ?))", (labeler, left, right, right, left)).fetchone():
                raise AlreadyAnswered(f"labeler {labeler!r} has already answered the pair ({left}, {right})")
            key = (labeler, min(left, right), max(left, right))
            served = con.execute("SELECT served FROM served WHERE labeler = ? AND low = ? AND high = ?", key).fetchone()
            if served is None:
                raise NotServed(f"the pair ({left}, {right}) is not awaiting an answer from labeler {labeler!r} "
                                f"(answers are accepted only for the pairs the app shows)")
            now = time.time()
            response_ms = max(0.0, (now - served[0]) * 1000)
            previous = con.execute("SELECT max(created) FROM comparisons WHERE labeler = ?", (labeler,)).fetchone()[0]
            since_previous = (now - previous) * 1000 if previous is not None and previous <= now else math.inf
            if min(response_ms, since_previous) < min_response_ms:
                waited = min(response_ms, since_previous)
                raise TooFast(f"answer refused: it came {waited:.0f} ms after the "
                              f"{'pair was shown' if response_ms <= since_previous else 'previous answer'}; "
                              f"take at least {min_response_ms:.0f} ms to look at both samples",
                              wait_ms=min_response_ms - waited)
            cid = self._insert_comparisons(con, [(uid, left, right, choice, labeler, now, response_ms)], once=True)[0]
            con.execute("DELETE FROM served WHERE labeler = ? AND low = ? AND high = ?", key)
        return cid, response_ms

    _COMPARISON_COLUMNS = "id, uid, left, right, choice, labeler, created, response_ms"

    @staticmethod
    def _comparison_dict(row) -> dict:
        return dict(zip(("id", "uid", "left", "right", "choice", "labeler", "created", "response_ms"), row))

    def comparisons(self, labeler: str | None = None) -> list[dict]:
        """All answers, oldest first (or one labeler's)."""
        sql = f"SELECT {self._COMPARISON_COLUMNS} FROM comparisons"
        with self._tx() as con:
            rows = con.execute(sql + (" WHERE labeler = ? ORDER BY id" if labeler else " ORDER BY id"),
                               (labeler,) if labeler else ()).fetchall()
        return [self._comparison_dict(row) for row in rows]

    def count_comparisons(self) -> int:
        with self._tx() as con:
            return con.execute("SELECT count(*) FROM comparisons").fetchone()[0]


    def dataset(self, task: str | None = None, labeler: str | None = None):
        """The answers as a `Comparisons` batch for reward learning: 'skip' is dropped, a tie is 0.5.

        Every comparison must be of one task (pass `task` when the store holds several) and, for
        conditional tasks, the condition must be a class label (int); it becomes `cond`."""
        return store_io.dataset(self, task=task, labeler=labeler)

    # --- what to ask next --------------------------------------------------------------------------
    def enqueue_pairs(self, pairs) -> int:
        """Append pairs for labelers to answer, in order; returns how many were new."""
        pairs = [(_item_id(a), _item_id(b)) for a, b in pairs]
        with self._tx(write=True) as con:
            return self._enqueue(con, pairs)

    def _enqueue(self, con, pairs) -> int:
        added = 0
        for left, right in pairs:
            self._check_pair(con, left, right)
            added += con.execute("INSERT OR IGNORE INTO queue (left, right) VALUES (?, ?)", (left, right)).rowcount
        return added

    def clear_queue(self) -> int:
        with self._tx(write=True) as con:
            return con.execute("DELETE FROM queue").rowcount

    def queue(self) -> list[tuple[int, int]]:
        with self._tx() as con:
            return [tuple(row) for row in con.execute("SELECT left, right FROM queue ORDER BY id")]

    _UNANSWERED = ("SELECT q.left, q.right FROM queue q WHERE NOT EXISTS (SELECT 1 FROM comparisons c WHERE "
                   "c.labeler = ? AND ((c.left = q.left AND c.right = q.right) OR (c.left = q.right AND c.right = q.left)))")

    def next_pair(self, labeler: str, *, rng: random.Random | None = None) -> tuple[int, int] | None:
        """A pair this labeler has not answered (in either order): the first such pair of the queue
        when the operator enqueued any (None once all are answered); otherwise a random pair of two
        items of the same task and condition (None once every such pair is answered)."""
        rng = rng or random.Random()
        with self._tx() as con:
            if con.execute("SELECT 1 FROM queue LIMIT 1").fetchone():
                row = con.execute(self._UNANSWERED + " ORDER BY q.id LIMIT 1", (labeler,)).fetchone()
                return tuple(row) if row else None
            groups: dict[tuple, list[int]] = {}
            for item_id, task, condition in con.execute("SELECT id, task, condition FROM items"):
                groups.setdefault((task, condition), []).append(item_id)
            answered = {frozenset(row) for row in
                        con.execute("SELECT left, right FROM comparisons WHERE labeler = ?", (labeler,))}
        groups = {k: v for k, v in groups.items() if len(v) >= 2}
        if not groups:
            return None
        keys = sorted(groups)
        weights = [len(groups[k]) * (len(groups[k]) - 1) for k in keys]
        for _ in range(64):  # rejection sampling: fast while most pairs are unanswered
            ids = groups[rng.choices(keys, weights)[0]]
            pair = tuple(rng.sample(ids, 2))
            if frozenset(pair) not in answered:
                return pair
        open_pairs = [(a, b) for k in keys for i, a in enumerate(groups[k]) for b in groups[k][i + 1:]
                      if frozenset((a, b)) not in answered]
        return rng.choice(open_pairs) if open_pairs else None

    def progress(self, labeler: str) -> dict:
        """answered: this labeler's answers; queued / remaining: the queue's size and what is left of
        it for this labeler (None when there is no queue and pairs are drawn at random)."""
        with self._tx() as con:
            answered = con.execute("SELECT count(*) FROM comparisons WHERE labeler = ?", (labeler,)).fetchone()[0]
            queued = con.execute("SELECT count(*) FROM queue").fetchone()[0]
            remaining = con.execute(f"SELECT count(*) FROM ({self._UNANSWERED})", (labeler,)).fetchone()[0]
        return {"labeler": labeler, "answered": answered, "queued": queued or None,
                "remaining": remaining if queued else None}

    # --- labelers ----------------------------------------------------------------------------------
    def add_labeler(self, name: str, *, replace: bool = False) -> str:
        """Register a labeler and return a fresh token (shown once: only its SHA-256 is stored).
        An existing name is an error unless replace=True, which issues a new token and voids the old."""
        check_name(name)
        token = secrets.token_urlsafe(24)
        with self._tx(write=True) as con:
            exists = con.execute("SELECT 1 FROM labelers WHERE name = ?", (name,)).fetchone()
            if exists and not replace:
                raise ScoreactionError(f"labeler {name!r} already exists (issue a new token with --replace)")
            con.execute("INSERT OR REPLACE INTO labelers VALUES (?, ?, ?)", (name, token_hash(token), time.time()))
        return token

    def labeler_for_token(self, token: str) -> str | None:
        """The labeler a token belongs to, or None."""
        if not isinstance(token, str) or not 16 <= len(token) <= 128:
            return None
        with self._tx() as con:
            row = con.execute("SELECT name FROM labelers WHERE token_sha256 = ?", (token_hash(token),)).fetchone()
        return row[0] if row else None

    def labelers(self) -> list[dict]:
        with self._tx() as con:
            return [{"name": n, "created": c} for n, c in con.execute("SELECT name, created FROM labelers ORDER BY name")]

    # --- summary, export, import -------------------------------------------------------------------
    def stats(self) -> dict:
        with self._tx() as con:
            items = [{"task": t, "model": m, "items": n} for t, m, n in
                     con.execute("SELECT task, model, count(*) FROM items GROUP BY task, model ORDER BY task, model")]
            by_labeler: dict[str, dict] = {}
            for labeler, choice, n in con.execute(
                    "SELECT labeler, choice, count(*) FROM comparisons GROUP BY labeler, choice ORDER BY labeler"):
                entry = by_labeler.setdefault(labeler, {"answers": 0, **{c: 0 for c in CHOICES}})
                entry[choice] = n
                entry["answers"] += n
            for labeler, ms in con.execute("SELECT labeler, avg(response_ms) FROM comparisons GROUP BY labeler"):
                by_labeler[labeler]["mean_response_ms"] = ms
            queued = con.execute("SELECT count(*) FROM queue").fetchone()[0]
            registered = [row[0] for row in con.execute("SELECT name FROM labelers ORDER BY name")]
        return {"store": str(self.path), "items": items, "comparisons": by_labeler, "queued": queued,
                "labelers": registered}


    def export_jsonl(self, path: str | os.PathLike) -> dict:
        """Write items (arrays as base64 of their .npy bytes), comparisons and the queue as JSON lines,
        atomically. Labeler tokens are not exported. Returns the counts."""
        return store_io.export_jsonl(self, path)

    def import_jsonl(self, path: str | os.PathLike) -> dict:
        """Read a file written by export_jsonl, all or nothing. Items already stored (same task,
        condition and content) keep their ids; comparisons already stored (same uid) are skipped, so
        importing a file twice adds nothing. A bad line is a ValueError naming the file and line."""
        return store_io.import_jsonl(self, path)
