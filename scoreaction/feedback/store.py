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

Every write is one `BEGIN IMMEDIATE` transaction (with a busy timeout and synchronous = FULL) on a
connection no other thread is using, so threads and processes labelling at once never lose or
interleave an answer, and a committed answer survives a crash or a power cut. A store is created
only on request (`PreferenceStore(path, create=True)`, `scoreaction feedback init`); opening a
missing, corrupt or foreign file is a ValueError naming the file.

Clock: none; `created` is Unix time in seconds, `response_ms` the labeler's time to answer.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import random
import re
import secrets
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np

FORMAT, VERSION = "scoreaction-preferences", 1
CHOICES = ("left", "right", "tie", "skip")
CHOICE_VALUE = {"left": 1.0, "right": 0.0, "tie": 0.5}  # P(left preferred); 'skip' carries no label
BUSY_TIMEOUT_MS = 30_000
POOL_SIZE = 8  # idle connections kept per store object
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}$")
SQLITE_MAGIC = b"SQLite format 3\x00"

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (
    id INTEGER PRIMARY KEY,
    task TEXT NOT NULL,
    condition TEXT NOT NULL,
    model TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    data BLOB NOT NULL,
    created REAL NOT NULL,
    UNIQUE (task, condition, sha256)
);
CREATE TABLE comparisons (
    id INTEGER PRIMARY KEY,
    uid TEXT NOT NULL UNIQUE,
    left INTEGER NOT NULL REFERENCES items(id),
    right INTEGER NOT NULL REFERENCES items(id),
    choice TEXT NOT NULL CHECK (choice IN ('left', 'right', 'tie', 'skip')),
    labeler TEXT NOT NULL,
    created REAL NOT NULL,
    response_ms REAL,
    CHECK (left <> right)
);
CREATE INDEX comparisons_by_labeler ON comparisons (labeler, left, right);
CREATE TABLE queue (
    id INTEGER PRIMARY KEY,
    left INTEGER NOT NULL REFERENCES items(id),
    right INTEGER NOT NULL REFERENCES items(id),
    UNIQUE (left, right)
);
CREATE TABLE labelers (name TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL UNIQUE, created REAL NOT NULL);
"""


class StoreError(ValueError):
    """The file is missing, corrupt, or not a preference store."""


class UnknownItem(ValueError):
    """An item id that the store does not hold."""


class AlreadyAnswered(ValueError):
    """This labeler has already answered this pair (raised only when asked to check: `once=True`)."""


# --- arrays <-> bytes: .npy, never pickle ------------------------------------------------------------
def as_array(sample) -> np.ndarray:
    """A numpy array of a numeric dtype from an array, a tensor or nested lists (C order, native endian)."""
    if hasattr(sample, "detach"):  # a torch tensor, without importing torch here
        sample = sample.detach().cpu().numpy()
    a = np.asarray(sample)
    if a.dtype.kind not in "biuf":
        raise ValueError(f"a sample must be an array of numbers (bool, int or float), found dtype {a.dtype}")
    return np.ascontiguousarray(a.astype(a.dtype.newbyteorder("="), copy=False))


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def png_array(png: bytes | str | os.PathLike) -> np.ndarray:
    """Decode a PNG (bytes or a file) to a uint8 (H, W, C) array: PNG is lossless, so nothing is lost."""
    from PIL import Image

    source = io.BytesIO(png) if isinstance(png, bytes) else png
    with Image.open(source) as im:
        if im.format != "PNG":
            raise ValueError(f"expected a PNG picture, found {im.format}")
        im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        return np.asarray(im, dtype=np.uint8)


def check_condition(condition):
    """None, a class label (int) or a prompt (str); numpy/torch integer scalars become int."""
    if condition is None or isinstance(condition, str):
        return condition
    if hasattr(condition, "item") and getattr(condition, "ndim", 1) == 0:
        condition = condition.item()
    if isinstance(condition, bool) or not isinstance(condition, int):
        raise ValueError(f"a condition must be None, a class label (int) or a prompt (str), found {condition!r}")
    return condition


def check_name(name, what: str = "labeler") -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValueError(f"{what} name must be 1-64 letters, digits or _.@+- (starting with a letter or digit), "
                         f"found {name!r}")
    return name


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# --- the store ---------------------------------------------------------------------------------------
class PreferenceStore:
    """Items and pairwise comparisons in one SQLite file; see the module docstring for the layout."""

    def __init__(self, path: str | os.PathLike, *, create: bool = False):
        self.path = Path(path)
        self._idle: list[sqlite3.Connection] = []
        self._forked: list[sqlite3.Connection] = []
        self._pool_lock = threading.Lock()
        self._pid = os.getpid()
        if not self.path.exists():
            if not create:
                raise StoreError(f"preference store {str(self.path)!r} does not exist (create it with "
                                 f"`scoreaction feedback init --store {self.path}`)")
            self._create()
        try:
            self._check()
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"PreferenceStore({str(self.path)!r})"

    # --- files and transactions ------------------------------------------------------------------
    def _create(self) -> None:
        """Build the empty store beside its final name, then link it into place (never over a file)."""
        if not self.path.parent.is_dir():
            raise StoreError(f"cannot create preference store {str(self.path)!r}: folder "
                             f"{str(self.path.parent)!r} does not exist")
        tmp = self.path.with_name(f".{self.path.name}.creating-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            con = sqlite3.connect(tmp, isolation_level=None)
            try:
                con.execute("PRAGMA journal_mode = WAL")
                con.execute("BEGIN")
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        con.execute(statement)
                con.executemany("INSERT INTO meta VALUES (?, ?)",
                                [("format", FORMAT), ("version", str(VERSION)), ("created", repr(time.time()))])
                con.execute("COMMIT")
            finally:
                con.close()
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                pass  # created meanwhile by someone else: open theirs
            except OSError:  # a file system without hard links: a rename, unless the name was taken
                if not self.path.exists():
                    os.replace(tmp, self.path)
        finally:
            for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
                leftover.unlink(missing_ok=True)

    def _check(self) -> None:
        where = f"preference store {str(self.path)!r}"
        if not self.path.is_file():
            raise StoreError(f"{where} is not a file")
        with open(self.path, "rb") as fh:
            if fh.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
                raise StoreError(f"{where} is not a preference store (not an SQLite database)")
        with self._tx() as con:
            try:
                meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
            except sqlite3.OperationalError:
                meta = {}
        if meta.get("format") != FORMAT:
            raise StoreError(f"{where} is an SQLite database but not a preference store (no {FORMAT!r} marker)")
        if meta.get("version") != str(VERSION):
            raise StoreError(f"{where} has format version {meta.get('version')!r}; this scoreaction reads {VERSION}")

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
        con.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        con.execute("PRAGMA foreign_keys = ON")
        con.execute("PRAGMA synchronous = FULL")  # a committed answer survives a power cut, not only a crash
        return con

    def _acquire(self) -> sqlite3.Connection:
        """An idle connection of this process, or a new one. Connections are reused (closing the last
        one checkpoints the WAL, which would cost every write several fsyncs) but never shared: each
        serves one transaction at a time, and a forked child never touches its parent's."""
        with self._pool_lock:
            if self._pid != os.getpid():
                self._forked.extend(self._idle)  # SQLite forbids using (or closing) them in the child
                self._idle, self._pid = [], os.getpid()
            if self._idle:
                return self._idle.pop()
        return self._connect()

    def _release(self, con: sqlite3.Connection) -> None:
        with self._pool_lock:
            if self._pid == os.getpid() and len(self._idle) < POOL_SIZE:
                self._idle.append(con)
                return
        con.close()

    def close(self) -> None:
        """Close the idle connections (the last one to close folds the WAL back into the file)."""
        with self._pool_lock:
            idle, self._idle = self._idle, []
        for con in idle:
            con.close()

    @contextmanager
    def _tx(self, write: bool = False):
        """One transaction: BEGIN IMMEDIATE for writes (takes the write lock up front, so
        check-then-insert is atomic across threads and processes), plain BEGIN for reads."""
        try:
            con = self._acquire()
        except sqlite3.Error as err:
            raise StoreError(f"preference store {str(self.path)!r} cannot be opened: {err}") from None
        healthy = False
        try:
            con.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            yield con
            con.execute("COMMIT")
            healthy = True
        except sqlite3.DatabaseError as err:
            _rollback(con)
            if isinstance(err, sqlite3.IntegrityError):
                healthy = True
                raise ValueError(f"preference store {str(self.path)!r} refused the write: {err}") from None
            raise StoreError(f"preference store {str(self.path)!r} is unreadable or corrupt: {err}") from None
        except BaseException:
            healthy = _rollback(con)
            raise
        finally:
            if healthy:
                self._release(con)
            else:
                con.close()

    # --- items -------------------------------------------------------------------------------------
    def add_items(self, samples, *, task: str, conditions=None, model: str = "") -> list[int]:
        """Add samples (a sequence, or an array/tensor whose first axis indexes samples) in one
        transaction; returns their ids. A sample already stored for the same task and condition
        keeps its id."""
        check_name(task, "task")
        if not isinstance(model, str) or len(model) > 500:
            raise ValueError(f"model must be a string of at most 500 characters, found {model!r}")
        arrays = [as_array(s) for s in samples]
        conditions = [None] * len(arrays) if conditions is None else [check_condition(c) for c in conditions]
        if len(conditions) != len(arrays):
            raise ValueError(f"got {len(arrays)} samples but {len(conditions)} conditions")
        with self._tx(write=True) as con:
            now = time.time()
            return [self._insert_item(con, a, task, c, model, now)[0] for a, c in zip(arrays, conditions)]

    @staticmethod
    def _insert_item(con, array: np.ndarray, task: str, condition, model: str, created: float) -> tuple[int, bool]:
        """(id, whether it is new) of one checked sample, inside a write transaction."""
        data = npy_bytes(array)
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
        return self.add_item(png_array(png), task=task, condition=condition, model=model)

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
            raise ValueError(f"a comparison needs two different items, found {left} twice")
        rows = dict(con.execute("SELECT id, task || char(0) || condition FROM items WHERE id IN (?, ?)",
                                (left, right)).fetchall())
        for i in (left, right):
            if i not in rows:
                raise UnknownItem(f"unknown item id {i}")
        if rows[left] != rows[right]:
            raise ValueError(f"items {left} and {right} belong to different tasks or conditions and cannot be compared")

    def add_comparisons(self, rows, *, once: bool = False) -> list[int]:
        """Add answers in one transaction. Each row is a dict with left, right, choice, labeler and
        optionally response_ms, created (Unix seconds) and uid. With once=True a labeler may answer a
        pair (in either order) only once: a second answer raises AlreadyAnswered and nothing is written."""
        checked = [_check_comparison(row) for row in rows]
        with self._tx(write=True) as con:
            return self._insert_comparisons(con, checked, once)

    def _insert_comparisons(self, con, checked: list[tuple], once: bool = False) -> list[int]:
        ids = []
        for uid, left, right, choice, labeler, created, response_ms in checked:
            self._check_pair(con, left, right)
            if once and con.execute(
                    "SELECT 1 FROM comparisons WHERE labeler = ? AND ((left = ? AND right = ?) OR "
                    "(left = ? AND right = ?))", (labeler, left, right, right, left)).fetchone():
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

    def undo_last(self, labeler: str) -> dict | None:
        """Delete this labeler's latest answer; returns it (a dict), or None if there was none."""
        with self._tx(write=True) as con:
            row = con.execute(f"SELECT {self._COMPARISON_COLUMNS} FROM comparisons WHERE labeler = ? "
                              "ORDER BY id DESC LIMIT 1", (labeler,)).fetchone()
            if row is None:
                return None
            con.execute("DELETE FROM comparisons WHERE id = ?", (row[0],))
        return self._comparison_dict(row)

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
        import torch

        from scoreaction.rewards.preference import Comparisons

        sql = ("SELECT c.left, c.right, c.choice, l.task, l.condition FROM comparisons c JOIN items l "
               "ON l.id = c.left WHERE c.choice <> 'skip'")
        args = []
        if task is not None:
            sql, args = sql + " AND l.task = ?", args + [task]
        if labeler is not None:
            sql, args = sql + " AND c.labeler = ?", args + [labeler]
        with self._tx() as con:
            rows = con.execute(sql + " ORDER BY c.id", args).fetchall()
        if not rows:
            raise ValueError(f"preference store {str(self.path)!r} holds no answered comparisons"
                             + (f" for task {task!r}" if task else "") + (f" by {labeler!r}" if labeler else ""))
        tasks = sorted({row[3] for row in rows})
        if len(tasks) > 1:
            raise ValueError(f"the comparisons span several tasks {tasks}; choose one with task=...")
        ids = sorted({i for row in rows for i in row[:2]})
        arrays = dict(zip(ids, self.item_arrays(ids)))
        shapes = {arrays[i].shape for i in ids}
        if len(shapes) > 1:
            raise ValueError(f"the items of task {tasks[0]!r} have different shapes {sorted(shapes)}")

        def stack(column: int) -> torch.Tensor:
            return torch.as_tensor(np.stack([arrays[row[column]] for row in rows]), dtype=torch.float32)

        conditions = [json.loads(row[4]) for row in rows]
        if all(c is None for c in conditions):
            cond = None
        elif all(isinstance(c, int) for c in conditions):
            cond = torch.tensor(conditions, dtype=torch.long)
        else:
            raise ValueError("only class-label conditions (int) can become `cond`; found text prompts or a mix")
        choice = torch.tensor([CHOICE_VALUE[row[2]] for row in rows], dtype=torch.float32)
        return Comparisons(left=stack(0), right=stack(1), choice=choice, cond=cond)

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
                raise ValueError(f"labeler {name!r} already exists (issue a new token with --replace)")
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
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        counts = {"items": 0, "comparisons": 0, "queue": 0}
        try:
            with open(tmp, "w") as fh, self._tx() as con:
                fh.write(json.dumps({"format": FORMAT, "version": VERSION}) + "\n")
                for row in con.execute(f"SELECT {self._ITEM_COLUMNS}, data FROM items ORDER BY id"):
                    item = self._item_dict(row[:-1])
                    item.update(type="item", shape=list(item["shape"]), npy=base64.b64encode(row[-1]).decode())
                    fh.write(json.dumps(item) + "\n")
                    counts["items"] += 1
                for row in con.execute(f"SELECT {self._COMPARISON_COLUMNS} FROM comparisons ORDER BY id"):
                    fh.write(json.dumps({"type": "comparison", **self._comparison_dict(row)}) + "\n")
                    counts["comparisons"] += 1
                for left, right in con.execute("SELECT left, right FROM queue ORDER BY id"):
                    fh.write(json.dumps({"type": "queue", "left": left, "right": right}) + "\n")
                    counts["queue"] += 1
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return counts

    def import_jsonl(self, path: str | os.PathLike) -> dict:
        """Read a file written by export_jsonl, all or nothing. Items already stored (same task,
        condition and content) keep their ids; comparisons already stored (same uid) are skipped, so
        importing a file twice adds nothing. A bad line is a ValueError naming the file and line."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"import file {str(path)!r} does not exist")
        items, comparisons, queue = [], [], []
        with open(path) as fh:
            for number, line in enumerate(fh, 1):
                where = f"import file {str(path)!r} line {number}"
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{where}: expected a JSON object, found {type(record).__name__}")
                if number == 1:
                    if record.get("format") != FORMAT or record.get("version") != VERSION:
                        raise ValueError(f"{where}: expected the header {{'format': {FORMAT!r}, 'version': {VERSION}}}")
                    continue
                try:
                    kind = record.get("type")
                    if kind == "item":
                        data = base64.b64decode(record["npy"], validate=True)
                        if hashlib.sha256(data).hexdigest() != record["sha256"]:
                            raise ValueError("the array does not match its sha256")
                        array = npy_load(data)
                        created = record.get("created")
                        if isinstance(created, bool) or not isinstance(created, (int, float)):
                            raise ValueError(f"created must be Unix time in seconds, found {created!r}")
                        items.append((_item_id(record["id"]), array, check_name(record["task"], "task"),
                                      check_condition(record["condition"]), str(record.get("model", "")),
                                      float(created)))
                    elif kind == "comparison":
                        if not isinstance(record.get("uid"), str) or not re.fullmatch(r"[0-9a-f]{32}", record["uid"]):
                            raise ValueError(f"uid must be 32 hex digits, found {record.get('uid')!r}")
                        row = {k: record.get(k) for k in
                               ("uid", "left", "right", "choice", "labeler", "created", "response_ms")}
                        _check_comparison(row)
                        comparisons.append(row)
                    elif kind == "queue":
                        queue.append((record["left"], record["right"]))
                    else:
                        raise ValueError(f"type must be 'item', 'comparison' or 'queue', found {kind!r}")
                except (KeyError, TypeError, ValueError, base64.binascii.Error) as err:
                    detail = f"missing field {err}" if isinstance(err, KeyError) else str(err)
                    raise ValueError(f"{where}: {detail}") from None
        if not items and not comparisons and not queue and path.stat().st_size == 0:
            raise ValueError(f"import file {str(path)!r} is empty")
        with self._tx(write=True) as con:  # all or nothing
            ids, added = {}, 0
            for old_id, array, task, condition, model, created in items:
                ids[old_id], new = self._insert_item(con, array, task, condition, model, created)
                added += new

            def local(old, what):
                if old not in ids:
                    raise ValueError(f"import file {str(path)!r}: {what} refers to item {old!r}, which it does not hold")
                return ids[old]

            new_comparisons = [_check_comparison({**row, "left": local(row["left"], "a comparison"),
                                                  "right": local(row["right"], "a comparison")})
                               for row in comparisons
                               if not con.execute("SELECT 1 FROM comparisons WHERE uid = ?", (row["uid"],)).fetchone()]
            self._insert_comparisons(con, new_comparisons)
            queued = self._enqueue(con, [(local(a, "the queue"), local(b, "the queue")) for a, b in queue])
        return {"items_added": added, "items_existing": len(items) - added, "comparisons_added": len(new_comparisons),
                "comparisons_existing": len(comparisons) - len(new_comparisons), "queue_added": queued}


def _check_comparison(row: dict) -> tuple:
    """(uid, left, right, choice, labeler, created, response_ms) of an answer, checked."""
    choice = row.get("choice")
    if choice not in CHOICES:
        raise ValueError(f"choice must be one of {list(CHOICES)}, found {choice!r}")
    response_ms = row.get("response_ms")
    if response_ms is not None:
        if isinstance(response_ms, bool) or not isinstance(response_ms, (int, float)) or not 0 <= response_ms < 1e9:
            raise ValueError(f"response_ms must be a number of milliseconds >= 0 (or null), found {response_ms!r}")
        response_ms = float(response_ms)
    created = row.get("created")
    if created is not None and (isinstance(created, bool) or not isinstance(created, (int, float))
                                or not math.isfinite(created)):
        raise ValueError(f"created must be Unix time in seconds, found {created!r}")
    uid = row.get("uid") or uuid.uuid4().hex
    return (uid, _item_id(row.get("left")), _item_id(row.get("right")), choice, check_name(row.get("labeler")),
            time.time() if created is None else float(created), response_ms)


def _rollback(con: sqlite3.Connection) -> bool:
    """Roll back whatever is open; False if the connection is no longer usable."""
    try:
        if con.in_transaction:
            con.execute("ROLLBACK")
        return True
    except sqlite3.Error:
        return False


def _item_id(value) -> int:
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int) or not -2**63 <= value < 2**63:
        raise ValueError(f"an item id must be an integer, found {value!r}")
    return value
