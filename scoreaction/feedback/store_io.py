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
from scoreaction.io import check_output_file, fsync_path

if TYPE_CHECKING:
    from scoreaction.feedback.store import PreferenceStore


def export_jsonl(store: PreferenceStore, path: str | os.PathLike) -> dict:
    """Write items, comparisons and the queue as JSON lines, atomically; returns the counts."""
    path = check_output_file(path, "export file")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    counts = {"items": 0, "comparisons": 0, "queue": 0}
    try:
        with open(tmp, "w") as fh, store._tx() as con:
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
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
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
                record = json.loads(line)
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
                    if not isinstance(record.get("uid"), str) or not re.fullmatch(r"[0-9a-f]{32}", record["uid"]):
                        raise ScoreactionError(f"uid must be 32 hex digits, found {record.get('uid')!r}")
                    row = {k: record.get(k) for k in ("uid", "left", "right", "choice", "labeler", "created",
                                                      "response_ms")}
                    check_comparison(row)
                    comparisons.append(row)
                elif kind == "queue":
                    queue.append((record["left"], record["right"]))
                else:
                    raise ScoreactionError(f"type must be 'item', 'comparison' or 'queue', found {kind!r}")
            except (KeyError, TypeError, ValueError, binascii.Error) as err:
                detail = f"missing field {err}" if isinstance(err, KeyError) else str(err)
                raise ScoreactionError(f"{where}: {detail}") from None
    if not items and not comparisons and not queue and path.stat().st_size == 0:
        raise ScoreactionError(f"import file {str(path)!r} is empty")
    return items, comparisons, queue


def read_item(record: dict) -> tuple:
    """(old id, array, task, condition, model, created) of one item line."""
    data = base64.b64decode(record["npy"], validate=True)
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise ScoreactionError("the array does not match its sha256")
    array = npy_load(data)
    created = record.get("created")
    if isinstance(created, bool) or not isinstance(created, (int, float)):
        raise ScoreactionError(f"created must be Unix time in seconds, found {created!r}")
    return (as_item_id(record["id"]), array, check_name(record["task"], "task"), check_condition(record["condition"]),
            str(record.get("model", "")), float(created))


def import_jsonl(store: PreferenceStore, path: str | os.PathLike) -> dict:
    """Add what an export file holds, in one transaction (all or nothing); returns the counts."""
    path = Path(path)
    items, comparisons, queue = read_jsonl(path)
    with store._tx(write=True) as con:
        ids, added = {}, 0
        for old_id, array, task, condition, model, created in items:
            ids[old_id], new = store._insert_item(con, array, task, condition, model, created)
            added += new

        def local(old, what):
            if old not in ids:
                raise ScoreactionError(f"import file {str(path)!r}: {what} refers to item {old!r}, "
                                       f"which it does not hold")
            return ids[old]

        new_comparisons = [check_comparison({**row, "left": local(row["left"], "a comparison"),
                                             "right": local(row["right"], "a comparison")})
                           for row in comparisons
                           if not con.execute("SELECT 1 FROM comparisons WHERE uid = ?", (row["uid"],)).fetchone()]
        store._insert_comparisons(con, new_comparisons)
        queued = store._enqueue(con, [(local(a, "the queue"), local(b, "the queue")) for a, b in queue])
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
