"""Input files a run cannot use: an error naming the file, or (with data.skip_bad) a warning and a tally."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ttt_speech.errors import UsageError

log = logging.getLogger(__name__)


class BadInputError(UsageError):
    """A data file that cannot be used; the message names the file (one line on the command line, exit 2)."""


@dataclass
class SkipLog:
    """Files skipped under --skip-bad, with why; reported at the end of a run."""

    skip_bad: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def bad(self, path: str | Path, why: str) -> None:
        """Raise BadInputError naming `path`, or log and count it when skipping is allowed."""
        message = f"{path}: {why}"
        if not self.skip_bad:
            raise BadInputError(message)
        log.warning("skipping %s", message)
        self.skipped.append((str(path), why))

    def summary(self) -> str:
        return f"skipped {len(self.skipped)} bad file(s)" + "".join(f"\n  {p}: {w}" for p, w in self.skipped)
