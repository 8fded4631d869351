"""`scoreaction feedback ...` (placeholder until the preference store lands)."""


def register(sub) -> None:
    pass
