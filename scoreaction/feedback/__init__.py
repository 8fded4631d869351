"""Human (and simulated) feedback: the preference store, labelers, pair selection and the labeling app.

    store.py      PreferenceStore: items, comparisons, labeler tokens in one SQLite file
    app.py        the labeling web app (FastAPI): `create_app(store)`; `scoreaction feedback serve`
    labelers.py   simulated Bradley-Terry labelers with a hidden utility
    selection.py  which pairs to ask about (random, disagreement of a reward ensemble)

Only the store is imported here: the web app needs FastAPI and nothing else should import it.
"""

from scoreaction.feedback.store import CHOICES, AlreadyAnswered, PreferenceStore, StoreError, UnknownItem

__all__ = ["CHOICES", "AlreadyAnswered", "PreferenceStore", "StoreError", "UnknownItem"]
