"""The one exception type the CLI turns into a one-line message (exit code 2)."""
from __future__ import annotations


class SegpipeError(Exception):
    """Bad input or setup: the message names the file or URL and what was expected."""
