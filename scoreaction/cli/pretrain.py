"""`scoreaction pretrain ...` (placeholder until the digits model lands)."""


def register(sub) -> None:
    pass
