"""The one error of the suite tools: a suite that cannot be used as written or run as asked."""

from __future__ import annotations


class SuiteError(ValueError):
    """A suite file that cannot be used: the text names the file, the key and the reason."""
