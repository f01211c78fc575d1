"""The scripts' positional values: true/false and positive integers, one error line naming the argument."""

from __future__ import annotations

from thinksafe.registry.families import RegistryError


def parse_bool(value: str, name: str) -> bool:
    """The scripts' true/false arguments; anything else is an error naming the argument."""
    lowered = str(value).strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise RegistryError(f"{name} must be true or false, got {value!r}")


def parse_positive_int(value, name: str) -> int:
    try:
        number = int(str(value))
    except ValueError:
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise RegistryError(f"{name} must be a positive integer, got {value!r}")
    return number
