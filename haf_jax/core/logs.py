"""The one log line path of every command: messages to stderr, from process 0 only (on a pod every
host runs the same command; one copy of each line is enough)."""

from __future__ import annotations

import sys

import jax


def log(msg: str) -> None:
    """Prints `msg` to stderr on process 0 only."""
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)
