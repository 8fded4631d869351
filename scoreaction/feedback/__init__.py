"""Human (and simulated) feedback: the preference store, labelers, pair selection and the labeling app.

    store.py      PreferenceStore: items, comparisons, labeler tokens in one SQLite file
    database.py   the store's SQLite file: creation, checks, one connection per thread, transactions
    records.py    what the store holds, checked: arrays as .npy bytes, names, answers
    store_io.py   JSONL export/import and the torch dataset of a store
    app.py        the labeling web app (FastAPI): `create_app(store)`; `scoreaction feedback serve`
    server.py     its listening socket and uvicorn server, with the connection limits of connections.py
    render.py     items drawn as PNG pictures for the app (Pillow)
    labelers.py   simulated Bradley-Terry labelers with a hidden utility
    selection.py  which pairs to ask about (random, disagreement of a reward ensemble)

Only the store is imported here: the web app needs FastAPI and nothing else should import it.
"""

from scoreaction.feedback.store import (
    CHOICES,
    AlreadyAnswered,
    NotServed,
    PreferenceStore,
    StoreError,
    TooFast,
    UnknownItem,
)

__all__ = ["CHOICES", "AlreadyAnswered", "NotServed", "PreferenceStore", "StoreError", "TooFast", "UnknownItem"]
