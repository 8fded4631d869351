"""`scoreaction reward ...` (placeholder until reward models land)."""


def register(sub) -> None:
    pass
