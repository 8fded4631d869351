"""The SQLite file under a preference store (its tables are described in store.py): created
atomically and only on request, checked to be one, and served through one connection per thread.

Each thread gets its own connection, opened on first use and kept (closing the last one would
checkpoint the WAL, costing every write several fsyncs). The PID is recorded with it, so a forked child
opens its own and never touches its parent's (SQLite forbids using, or even closing, them there).
`close()` folds the WAL back into the file (`wal_checkpoint(TRUNCATE)`) and closes them all;
`backup(dest)` copies the store while others write (SQLite's online backup API).
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
import time
import weakref
from contextlib import contextmanager
from pathlib import Path

from scoreaction.errors import OutputError, ScoreactionError
from scoreaction.io import fsync_path, remove_stale
from scoreaction.outputs import check_output_file

FORMAT, VERSION = "scoreaction-preferences", 1
BUSY_TIMEOUT_MS = 30_000
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

# Tables added to version 1 after its first release. Older code ignores them, so the version stays 1; a
# store that lacks one gets it when it is opened (one write transaction, the first time only).
ADDED_TABLES = {
    "served": """
CREATE TABLE IF NOT EXISTS served (
    labeler TEXT NOT NULL,
    low INTEGER NOT NULL REFERENCES items(id),
    high INTEGER NOT NULL REFERENCES items(id),
    served REAL NOT NULL,
    PRIMARY KEY (labeler, low, high)
)""",
}


class StoreError(ScoreactionError):
    """The file is missing, corrupt, or not a preference store."""


class Database:
    """One preference-store file: `transaction()` on this thread's connection, `close()`."""

    def __init__(self, path: str | os.PathLike, *, create: bool = False):
        self.path = Path(path)
        self._local = threading.local()  # .con, .pid, .generation: this thread's connection
        self._opened: list[tuple[int, weakref.ref, sqlite3.Connection]] = []  # (pid, its thread, connection)
        self._lock = threading.Lock()
        self._generation = 0  # close() bumps it: every thread then opens a new connection
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
                for statement in ADDED_TABLES.values():
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
        with self.transaction() as con:
            try:
                meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
            except sqlite3.OperationalError:
                meta = {}
        if meta.get("format") != FORMAT:
            raise StoreError(f"{where} is an SQLite database but not a preference store (no {FORMAT!r} marker)")
        if meta.get("version") != str(VERSION):
            raise StoreError(f"{where} has format version {meta.get('version')!r}; this scoreaction reads {VERSION}")
        self._add_missing_tables()

    def _add_missing_tables(self) -> None:
        """Create the tables of ADDED_TABLES that a store made by an earlier release lacks."""
        with self.transaction() as con:
            present = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        missing = [statement for name, statement in ADDED_TABLES.items() if name not in present]
        if missing:
            with self.transaction(write=True) as con:
                for statement in missing:
                    con.execute(statement)

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use (again after a fork or a close())."""
        local, pid = self._local, os.getpid()
        if getattr(local, "pid", None) == pid and local.generation == self._generation:
            return local.con
        con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                              check_same_thread=False)  # close() may close it from another thread
        try:
            con.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            con.execute("PRAGMA foreign_keys = ON")
            con.execute("PRAGMA synchronous = FULL")  # a committed answer survives a power cut, not only a crash
        except BaseException:
            con.close()
            raise
        with self._lock:
            # a connection of a thread that has ended is closed; those inherited across a fork stay
            # referenced and untouched (SQLite forbids using, or closing, them in the child)
            ended = [e for e in self._opened if e[0] == pid and not (e[1]() and e[1]().is_alive())]
            self._opened = [e for e in self._opened if e not in ended]
            self._opened.append((pid, weakref.ref(threading.current_thread()), con))
            local.con, local.pid, local.generation = con, pid, self._generation
        for _, _, old in ended:
            old.close()
        return con

    def _discard(self, con: sqlite3.Connection) -> None:
        """Close a connection that failed; this thread opens a new one next time."""
        with self._lock:
            self._opened = [e for e in self._opened if e[2] is not con]
            if getattr(self._local, "con", None) is con:
                self._local.pid = None
        con.close()

    def close(self) -> None:
        """Close every connection this store opened in this process, after folding the WAL back into
        the file (`wal_checkpoint(TRUNCATE)`), so that the store is one file again. Call it when no
        other thread is using the store; using it afterwards opens new connections."""
        pid = os.getpid()
        with self._lock:
            mine = [e[2] for e in self._opened if e[0] == pid]
            self._opened = [e for e in self._opened if e[0] != pid]
            self._generation += 1
        for k, con in enumerate(mine):
            try:
                if k == 0:
                    con.execute("PRAGMA busy_timeout = 1000")  # another process's reader does not hold us long
                    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # busy or unreadable: the last close still checkpoints what it can
            finally:
                con.close()

    def backup(self, dest: str | os.PathLike, *, overwrite: bool = False) -> dict:
        """Copy the store into the new file `dest` with SQLite's online backup API: a consistent copy of
        what was committed when the copy began, while other threads and processes go on writing. The
        copy is checked (`PRAGMA integrity_check`), built beside `dest` and linked into place, so `dest`
        is whole or absent and an existing file is never overwritten, unless `overwrite` (then the copy is
        renamed over it; a store with a journal beside it, in use or not closed, is still refused). Returns
        the copy's row counts."""
        dest = Path(dest)
        taken = f"backup file {str(dest)!r} already exists; pass --overwrite to replace it (or choose a new name)"
        if dest.is_symlink() or (dest.exists() and not overwrite):
            raise OutputError(taken)
        journals = [Path(f"{dest}{suffix}") for suffix in ("-wal", "-journal") if Path(f"{dest}{suffix}").exists()]
        if dest.exists() and journals:
            raise OutputError(f"backup file {str(dest)!r} is in use or was not closed ({journals[0].name} beside it); "
                              f"it is not replaced")
        check_output_file(dest, "backup file")
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(dest.parent, names=(dest.name,))
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        leftovers = [tmp] + [Path(f"{tmp}{suffix}") for suffix in ("-wal", "-shm", "-journal")]
        try:
            for path in leftovers:
                path.unlink(missing_ok=True)
            try:
                source = self._connection()
                target = sqlite3.connect(tmp, isolation_level=None)
                try:
                    source.backup(target)
                    status = target.execute("PRAGMA integrity_check").fetchone()[0]
                    counts = {table: target.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                              for table in ("items", "comparisons", "queue", "labelers")}
                finally:
                    target.close()
            except sqlite3.Error as err:
                raise StoreError(f"preference store {str(self.path)!r} could not be backed up: {err}") from None
            if status != "ok":
                raise StoreError(f"the backup of {str(self.path)!r} fails its integrity check: {status}")
            fsync_path(tmp)
            if overwrite and dest.exists():
                os.replace(tmp, dest)
            else:
                self._link_new(tmp, dest, taken)
            fsync_path(dest.parent)
        finally:
            for path in leftovers:
                path.unlink(missing_ok=True)
        return counts

    @staticmethod
    def _link_new(tmp: Path, dest: Path, taken: str) -> None:
        """Put `tmp` at the new name `dest`; an existing `dest` (made meanwhile) is refused, never replaced."""
        try:
            os.link(tmp, dest)
        except FileExistsError:
            raise OutputError(taken) from None
        except OSError:  # a file system without hard links
            if dest.exists():
                raise OutputError(taken) from None
            os.replace(tmp, dest)

    @contextmanager
    def transaction(self, write: bool = False):
        """One transaction on this thread's connection: BEGIN IMMEDIATE for writes (takes the write
        lock up front, so check-then-insert is atomic across threads and processes), BEGIN for reads."""
        try:
            con = self._connection()
        except sqlite3.Error as err:
            raise StoreError(f"preference store {str(self.path)!r} cannot be opened: {err}") from None
        if con.in_transaction:
            raise RuntimeError("transactions of a preference store do not nest (one is open in this thread)")
        try:
            con.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            yield con
            con.execute("COMMIT")
        except sqlite3.IntegrityError as err:
            if not _rollback(con):
                self._discard(con)
            raise ScoreactionError(f"preference store {str(self.path)!r} refused the write: {err}") from None
        except sqlite3.DatabaseError as err:
            _rollback(con)
            self._discard(con)
            raise StoreError(f"preference store {str(self.path)!r} {_what_failed(err)}: {err}") from None
        except BaseException:
            if not _rollback(con):
                self._discard(con)
            raise


# SQLite's result codes that are the machine's doing, not a damaged file (sqlite3.Error.sqlite_errorname)
MACHINE_ERRORS = {"SQLITE_FULL": "could not be written: the disk is full",
                  "SQLITE_READONLY": "could not be written: it or its folder is read-only",
                  "SQLITE_IOERR": "could not be read or written (an I/O error of the disk)",
                  "SQLITE_CANTOPEN": "could not be opened (is its folder writable?)",
                  "SQLITE_BUSY": "is locked by another process", "SQLITE_LOCKED": "is locked by another process",
                  "SQLITE_NOMEM": "could not be read: out of memory", "SQLITE_PERM": "could not be opened: no permission"}


def _what_failed(err: sqlite3.DatabaseError) -> str:
    """What an SQLite error says of the store: the disk or the machine (MACHINE_ERRORS), else damage."""
    name = getattr(err, "sqlite_errorname", "") or ""
    for code, what in MACHINE_ERRORS.items():
        if name == code or name.startswith(code + "_"):
            return what
    if "disk is full" in str(err):
        return MACHINE_ERRORS["SQLITE_FULL"]
    return "is unreadable or corrupt"


def _rollback(con: sqlite3.Connection) -> bool:
    """Roll back whatever is open; False if the connection is no longer usable."""
    try:
        if con.in_transaction:
            con.execute("ROLLBACK")
        return True
    except sqlite3.Error:
        return False
