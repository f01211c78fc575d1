"""Grids of runs: models x variants x seeds (x a sweep) in one command (`thinksafe grid`)."""

from thinksafe.grid.run import main

__all__ = ["main"]
