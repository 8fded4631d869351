"""Data in and out of a preference store: JSON lines (export and import, all or nothing) and the
`Comparisons` batch for reward learning. `PreferenceStore.export_jsonl`, `.import_jsonl` and `.dataset`
call these; they use the store's transactions and row helpers, so they live beside it.

JSONL layout: a header line {"format": ..., "version": ...}, then one object a line:
    {"type": "item", "id", "task", "condition", "model", "sha256", "dtype", "shape", "created", "npy"}
        npy is the base64 of the item's .npy bytes (checked against sha256, never unpickled)
    {"type": "comparison", "id", "uid", "left", "right", "choice", "labeler", "created", "response_ms"}
    {"type": "queue", "left", "right"}
Labeler tokens are never exported.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from scoreaction.config import check_timestamp, shown
from scoreaction.errors import ScoreactionError
from scoreaction.feedback.database import FORMAT, VERSION
from scoreaction.feedback.records import (
    CHOICE_VALUE,
    as_item_id,
    check_comparison,
    check_condition,
    check_name,
    npy_load,
)
from scoreaction.io import atomic_file
from scoreaction.outputs import check_output_file

if TYPE_CHECKING:
    from scoreaction.feedback.store import PreferenceStore


def export_jsonl(store: PreferenceStore, path: str | os.PathLike) -> dict:
    """Write items, comparisons and the queue as JSON lines, atomically; returns the counts."""
    path = check_output_file(path, "export file")
    counts = {"items": 0, "comparisons": 0, "queue": 0}
    with atomic_file(path) as fh, store._tx() as con:  # removes what killed exports to `path` left
        fh.write(json.dumps({"format": FORMAT, "version": VERSION}) + "\n")
        for row in con.execute(f"SELECT {store._ITEM_COLUMNS}, data FROM items ORDER BY id"):
            item = store._item_dict(row[:-1])
            item.update(type="item", shape=list(item["shape"]), npy=base64.b64encode(row[-1]).decode())
            fh.write(json.dumps(item) + "\n")
            counts["items"] += 1
        for row in con.execute(f"SELECT {store._COMPARISON_COLUMNS} FROM comparisons ORDER BY id"):
            fh.write(json.dumps({"type": "comparison", **store._comparison_dict(row)}) + "\n")
            counts["comparisons"] += 1
        for left, right in con.execute("SELECT left, right FROM queue ORDER BY id"):
            fh.write(json.dumps({"type": "queue", "left": left, "right": right}) + "\n")
            counts["queue"] += 1
    return counts


def read_jsonl(path: Path) -> tuple[list, list, list]:
    """(items, comparisons, queue) of an export file, every line checked; a bad line is a ValueError
    naming the file and the line."""
    if not path.is_file():
        raise ScoreactionError(f"import file {str(path)!r} " + ("is not a file" if path.exists() else "does not exist"))
    items, comparisons, queue = [], [], []
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            where = f"import file {str(path)!r} line {number}"
            try:
                line = raw.decode()
                if not line.strip():
                    continue
                record = json.loads(line, object_pairs_hook=unique_keys)
            except UnicodeDecodeError:
                raise ScoreactionError(f"{where}: not UTF-8 text") from None
            except json.JSONDecodeError as err:
                raise ScoreactionError(f"{where}: not valid JSON ({err.msg})") from None
            except (ValueError, RecursionError) as err:  # an integer of over 4300 digits, nesting too deep
                detail = "nested too deeply" if isinstance(err, RecursionError) else str(err).split(";")[0]
                raise ScoreactionError(f"{where}: not valid JSON ({detail})") from None
            if not isinstance(record, dict):
                raise ScoreactionError(f"{where}: expected a JSON object, found {type(record).__name__}")
            if number == 1:
                if record.get("format") != FORMAT or record.get("version") != VERSION:
                    raise ScoreactionError(f"{where}: expected the header "
                                           f"{{'format': {FORMAT!r}, 'version': {VERSION}}}")
                continue
            try:
                kind = record.get("type")
                if kind == "item":
                    items.append(read_item(record))
                elif kind == "comparison":
                    comparisons.append({**read_comparison(record), "line": number})
                elif kind == "queue":
                    pair = field(record, "left", as_item_id), field(record, "right", as_item_id)
                    if pair[0] == pair[1]:
                        raise ScoreactionError(f"a queued pair needs two different items, found {pair[0]} twice")
                    queue.append((*pair, number))
                else:
                    raise ScoreactionError(f"type must be 'item', 'comparison' or 'queue', found {shown(kind)}")
            except (TypeError, ValueError, binascii.Error) as err:
                raise ScoreactionError(f"{where}: {err}") from None
    if not items and not comparisons and not queue and path.stat().st_size == 0:
        raise ScoreactionError(f"import file {str(path)!r} is empty")
    return items, comparisons, queue


def unique_keys(pairs: list) -> dict:
    """A JSON object whose keys each appear once (parsers disagree on which of two values wins)."""
    record = dict(pairs)
    if len(record) != len(pairs):
        seen = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {twice!r} appears twice in one object")
    return record


def field(record: dict, name: str, check):
    """`check(record[name])`; a missing field, or one that `check` refuses, is an error naming the field."""
    if name not in record:
        raise ScoreactionError(f"missing field {name!r}")
    try:
        return check(record[name])
    except (TypeError, ValueError, OverflowError, binascii.Error) as err:
        detail = str(err)
        for prefix in (f"{name} ", "an item id ", "a condition ", "a sample's ", "a sample "):
            if detail.startswith(prefix):
                detail = detail[len(prefix):]
                break
        raise ScoreactionError(f"field {name!r} {detail}") from None


def _text(value) -> str:
    if not isinstance(value, str) or len(value) > 1000:
        raise ScoreactionError(f"must be a string of at most 1000 characters, found {shown(value)}")
    return value


def _timestamp(value) -> float:
    check_timestamp("created", value)
    return float(value)


def _sha256(value) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ScoreactionError(f"must be 64 hex digits, found {shown(value)}")
    return value


def read_item(record: dict) -> tuple:
    """(old id, array, task, condition, model, created) of one item line, field by field."""
    data = field(record, "npy", _base64)
    if hashlib.sha256(data).hexdigest() != field(record, "sha256", _sha256):
        raise ScoreactionError("field 'npy' does not match its sha256")
    array = field(record, "npy", lambda _: npy_load(data))
    for name, value in (("shape", list(array.shape)), ("dtype", array.dtype.str)):
        if name in record and record[name] != value:
            raise ScoreactionError(f"field {name!r} must be {value!r}, what its npy holds, found {shown(record[name])}")
    model = field(record, "model", _text) if "model" in record else ""
    return (field(record, "id", as_item_id), array, field(record, "task", lambda v: check_name(v, "task")),
            field(record, "condition", check_condition), model, field(record, "created", _timestamp))


def read_comparison(record: dict) -> dict:
    """The answer of one comparison line, field by field (check_comparison checks them together after)."""
    field(record, "uid", _uid)
    for name in ("left", "right"):
        field(record, name, as_item_id)
    field(record, "created", _timestamp)
    row = {k: record.get(k) for k in ("uid", "left", "right", "choice", "labeler", "created", "response_ms")}
    check_comparison(row)
    return row


def _uid(value) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{32}", value):
        raise ScoreactionError(f"must be 32 hex digits, found {shown(value)}")
    return value


def _base64(value) -> bytes:
    if not isinstance(value, str):
        raise ScoreactionError(f"must be base64 text, found {shown(value)}")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as err:
        raise ScoreactionError(f"is not base64 ({err})") from None


def import_jsonl(store: PreferenceStore, path: str | os.PathLike) -> dict:
    """Add what an export file holds, in one transaction (all or nothing); returns the counts."""
    path = Path(path)
    items, comparisons, queue = read_jsonl(path)
    with store._tx(write=True) as con:
        ids, added = {}, 0
        for old_id, array, task, condition, model, created in items:
            ids[old_id], new = store._insert_item(con, array, task, condition, model, created)
            added += new

        def local(old, what, line):
            if old not in ids:
                raise ScoreactionError(f"import file {str(path)!r} line {line}: {what} refers to item {old!r}, "
                                       f"which the file does not hold")
            return ids[old]

        new_comparisons, uids = [], {}
        for row in comparisons:
            line = row.pop("line")
            answer = check_comparison({**row, "left": local(row["left"], "the comparison", line),
                                       "right": local(row["right"], "the comparison", line)})
            stored = con.execute("SELECT left, right, choice, labeler FROM comparisons WHERE uid = ?",
                                 (row["uid"],)).fetchone() or uids.get(row["uid"])
            if stored is not None and tuple(stored) != answer[1:5]:
                raise ScoreactionError(f"import file {str(path)!r} line {line}: comparison uid {row['uid']} is "
                                       f"already stored as {tuple(stored)} (left, right, choice, labeler); this "
                                       f"line says {answer[1:5]}")
            if stored is None:
                new_comparisons.append(answer)
                uids[row["uid"]] = answer[1:5]
        store._insert_comparisons(con, new_comparisons)
        queued = store._enqueue(con, [(local(a, "the queue", line), local(b, "the queue", line))
                                      for a, b, line in queue])
    return {"items_added": added, "items_existing": len(items) - added, "comparisons_added": len(new_comparisons),
            "comparisons_existing": len(comparisons) - len(new_comparisons), "queue_added": queued}


def dataset(store: PreferenceStore, task: str | None = None, labeler: str | None = None):
    """The answers as a `Comparisons` batch; see PreferenceStore.dataset."""
    import torch

    from scoreaction.rewards.preference import Comparisons

    sql = ("SELECT c.left, c.right, c.choice, l.task, l.condition FROM comparisons c JOIN items l "
           "ON l.id = c.left WHERE c.choice <> 'skip'")
    args = []
    if task is not None:
        sql, args = sql + " AND l.task = ?", args + [task]
    if labeler is not None:
        sql, args = sql + " AND c.labeler = ?", args + [labeler]
    with store._tx() as con:
        rows = con.execute(sql + " ORDER BY c.id", args).fetchall()
    if not rows:
        raise ScoreactionError(f"preference store {str(store.path)!r} holds no answered comparisons"
                         + (f" for task {task!r}" if task else "") + (f" by {labeler!r}" if labeler else ""))
    tasks = sorted({row[3] for row in rows})
    if len(tasks) > 1:
        raise ScoreactionError(f"the comparisons span several tasks {tasks}; choose one with task=...")
    ids = sorted({i for row in rows for i in row[:2]})
    arrays = dict(zip(ids, store.item_arrays(ids)))
    shapes = {arrays[i].shape for i in ids}
    if len(shapes) > 1:
        raise ScoreactionError(f"the items of task {tasks[0]!r} have different shapes {sorted(shapes)}")

    def stack(column: int) -> torch.Tensor:
        return torch.as_tensor(np.stack([arrays[row[column]] for row in rows]), dtype=torch.float32)

    conditions = [json.loads(row[4]) for row in rows]
    if all(c is None for c in conditions):
        cond = None
    elif all(isinstance(c, int) for c in conditions):
        cond = torch.tensor(conditions, dtype=torch.long)
    else:
        raise ScoreactionError("only class-label conditions (int) can become `cond`; found text prompts or a mix")
    choice = torch.tensor([CHOICE_VALUE[row[2]] for row in rows], dtype=torch.float32)
    return Comparisons(left=stack(0), right=stack(1), choice=choice, cond=cond)
