"""The releases of the libraries whose internals we touch, and the check that refuses any other.

transformers, moshi, torchao and flash-linear-attention are used below their public surface (cache
classes, streaming state, quantized tensor layouts, kernel signatures), so a new release can change our
numbers without raising. Each gets a range ending at the newest release our suite passed on;
`pyproject.toml` states the same ranges (a test holds them equal). A user who installs with
`--no-deps` bypasses pip's resolver, so each integration calls `require` at import: outside the
range it stops with one line naming the installed release and the supported one.

Widening a range after a new release: README, "When a dependency releases".
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet

from ttt_speech.errors import UsageError

# distribution name -> the releases the suite passed on
SUPPORTED: dict[str, str] = {
    "transformers": ">=5.23,<5.26",
    "moshi": "==0.2.13",
    "torchao": "==0.18.0",
    "flash-linear-attention": ">=0.6,<0.7",
}
# moshi pins torch<2.10 in its metadata, so it is installed without its dependencies (README)
_PIP_FLAGS: dict[str, str] = {"moshi": "--no-deps "}
OVERRIDE_ENV = "TTT_SPEECH_ALLOW_UNTESTED"  # names distributions to let through, for widening a range


class UnsupportedVersionError(ImportError, UsageError):
    """An installed release outside the range our suite passed on: an ImportError for code that imports
    optionally, and a UsageError, so a command ends with its one line (the fix is a pip command)."""


def installed(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def require(dist: str) -> str:
    """The installed release of `dist`; raises `UnsupportedVersionError` outside `SUPPORTED[dist]`.

    Listing the distribution in the environment variable TTT_SPEECH_ALLOW_UNTESTED (comma-separated)
    lets an untested release through: that is how the suite is run on a new release before widening.
    """
    spec = SUPPORTED[dist]
    fix = f"pip install {_PIP_FLAGS.get(dist, '')}'{dist}{spec}'"
    found = installed(dist)
    if found is None:
        raise UnsupportedVersionError(f"{dist} is not installed; run: {fix}")
    allowed = {x.strip() for x in os.environ.get(OVERRIDE_ENV, "").split(",")}
    if found not in SpecifierSet(spec) and dist not in allowed:
        raise UnsupportedVersionError(
            f"{dist} {found} is installed, but ttt-speech is tested with {dist}{spec} "
            f"(its internals change between releases); run: {fix}"
        )
    return found
