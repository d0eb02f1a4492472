"""Kept conversations on disk: one safetensors file per resume token, in the server's own directory.

A token is `secrets.token_urlsafe(32)` (256 random bits); the file name is made from the token
only after it matched the token pattern, so nothing a client sends ever becomes a path. Files are
single-use: taking one renames it first (two connections cannot resume the same conversation) and
then deletes it. A kept conversation expires after `max_age_s` (and so do files a crash left half
written or half taken): a client that never comes back must not hold a place in a bounded store
forever. The metadata carries a fingerprint of the model and of the state layout, so a
state is never poured into a model it was not made by. A conversation kept before issue 20 names its
memory branch's tensors `...ttt...`: it matches the model's `legacy_fingerprint` and resumes under
today's names.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ttt_speech.names import current_keys, legacy_name
from ttt_speech.serve.protocol import Close, ProtocolError, check_token
from ttt_speech.serve.streams import Layout

STATE_FORMAT = "ttt-speech/session"
STATE_VERSION = "1"
SUFFIX = ".safetensors"
_OWN_SUFFIXES = (SUFFIX, ".tmp", ".claimed")  # what save/take write; nothing else in the directory is touched


def fingerprint(model_id: str, layout: Layout) -> str:
    """A hash of the model's identity and of every per-stream tensor's name, shape and dtype."""
    spec = {"model": model_id, "layout": {k: [list(s), str(d)] for k, (s, d) in sorted(layout.items())}}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def legacy_fingerprint(model_id: str, layout: Layout) -> str:
    """The fingerprint the same model's states had before issue 20 (memory tensors named `ttt`)."""
    return fingerprint(model_id, {legacy_name(k): v for k, v in layout.items()})


class StateStore:
    """Save and take kept conversations; at most `max_files` at once, each for at most `max_age_s`.
    `legacy_fingerprint`: also take those this model kept before issue 20 (renaming their tensors)."""

    def __init__(self, root: str | Path, fingerprint: str, max_files: int = 100, max_age_s: float = 24 * 3600,
                 legacy_fingerprint: str | None = None) -> None:
        if max_files < 1 or max_age_s <= 0:
            raise ValueError(f"a state store keeps >= 1 file for > 0 s, got {max_files} files, {max_age_s} s")
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.fingerprint = fingerprint
        self.legacy_fingerprint = legacy_fingerprint
        self.max_files = max_files
        self.max_age_s = max_age_s

    def expire(self) -> int:
        """Delete this store's files older than `max_age_s`; returns how many went."""
        cutoff, gone = time.time() - self.max_age_s, 0
        for path in self.root.iterdir():
            if path.suffix not in _OWN_SUFFIXES:
                continue
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    gone += 1
            except FileNotFoundError:  # taken or expired by another call meanwhile
                continue
        return gone

    def _path(self, token: str, suffix: str = SUFFIX) -> Path:
        return self.root / f"{check_token(token)}{suffix}"

    def count(self) -> int:
        return sum(1 for _ in self.root.glob("*" + SUFFIX))

    def save(self, tensors: dict[str, Tensor], meta: dict[str, str]) -> str:
        """Write the tensors under a new token (atomically, owner-only) and return the token."""
        self.expire()
        if self.count() >= self.max_files:
            raise ProtocolError(Close.TRY_AGAIN_LATER, "store_full",
                                f"the server keeps at most {self.max_files} conversations; try again later")
        token = secrets.token_urlsafe(32)
        tmp = self._path(token, ".tmp")
        info = {"format": STATE_FORMAT, "version": STATE_VERSION, "fingerprint": self.fingerprint, **meta}
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp), metadata=info)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self._path(token))
        return token

    def take(self, token: str) -> tuple[dict[str, Tensor], dict[str, str]]:
        """Load the conversation kept under `token` and delete it; ProtocolError if unknown, expired or foreign."""
        path, claimed = self._path(token), self._path(token, ".claimed")
        self.expire()
        try:
            os.replace(path, claimed)
        except FileNotFoundError:
            raise ProtocolError(Close.POLICY_VIOLATION, "unknown_token",
                                "unknown, expired or already used resume token") from None
        try:
            with safe_open(str(claimed), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                tensors: dict[str, Tensor] = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # a truncated or tampered file: refuse it like an unknown token
            raise ProtocolError(Close.POLICY_VIOLATION, "corrupt_state", "the kept conversation is unreadable") from e
        finally:
            claimed.unlink(missing_ok=True)
        known = (meta.get("format"), meta.get("version")) == (STATE_FORMAT, STATE_VERSION)
        if known and self.legacy_fingerprint is not None and meta.get("fingerprint") == self.legacy_fingerprint:
            return current_keys(tensors), meta
        if not known or meta.get("fingerprint") != self.fingerprint:
            raise ProtocolError(Close.POLICY_VIOLATION, "foreign_state",
                                "this conversation was kept by a different model or server version")
        return tensors, meta
