"""User-facing errors: one line saying what is wrong, where, and the fix. The CLI prints them and exits
with code 2; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import difflib


class UserError(Exception):
    """Bad input from the user (recipe, override, data file, path). Message is one line."""


class ConfigError(UserError):
    """A recipe or override is invalid."""


class DataError(UserError):
    """A data file or row is malformed."""


def did_you_mean(word: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
