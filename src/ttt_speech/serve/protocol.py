"""Moshi's websocket protocol (moshi/rust/protocol.md), plus one control action for suspend/resume.

Every message is binary: one kind byte, then the payload. Audio is Ogg/Opus at 24 kHz mono in both
directions; the server sends text pieces as UTF-8. Moshi's own clients (python -m moshi.client,
the web UI) only send audio, and ignore kinds they do not know, so the additions here are invisible
to them:

- control SUSPEND (kind 3, action 0x10): keep this conversation. The server answers with a
  metadata message {"resume_token": ..., "frames": ...} and closes the connection normally.
- GET /api/chat?resume=TOKEN continues a kept conversation; ?seed=N fixes a new one's sampling.

Pure functions and constants only: the server and test clients share them.
"""

from __future__ import annotations

import json
import re
import typing as tp
from enum import IntEnum


class Kind(IntEnum):
    """Message kinds (the first byte)."""

    HANDSHAKE = 0  # server -> client, when the session is ready: version u32 + model u32 (both 0)
    AUDIO = 1  # both ways: Ogg/Opus bytes
    TEXT = 2  # server -> client: UTF-8 text piece
    CONTROL = 3  # client -> server: one action byte
    METADATA = 4  # server -> client: UTF-8 JSON
    ERROR = 5  # server -> client: UTF-8 reason, sent before the server closes a faulty session
    PING = 6  # either way, no payload, unused


class Control(IntEnum):
    """Control actions. 0-3 are moshi's (unused in full-duplex streaming); SUSPEND is ours."""

    START = 0
    END_TURN = 1
    PAUSE = 2
    RESTART = 3
    SUSPEND = 0x10


CONTROL_VALUES = frozenset(c.value for c in Control)


class Close(IntEnum):
    """Websocket close codes the server uses (RFC 6455 section 7.4.1)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    UNSUPPORTED_DATA = 1003
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013


HANDSHAKE = bytes([Kind.HANDSHAKE]) + bytes(8)
SERVER_ONLY = frozenset({Kind.HANDSHAKE, Kind.TEXT, Kind.METADATA, Kind.ERROR})

# secrets.token_urlsafe(32): 43 characters of the URL-safe base64 alphabet, nothing else.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{43}")
SEED_MAX = 2**63 - 1
_SEED_PATTERN = re.compile(r"[0-9]{1,19}")


class ProtocolError(Exception):
    """A client broke the protocol: the session is closed with `code` and `reason`; `slug` names it in metrics."""

    def __init__(self, code: Close, slug: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.slug, self.reason = code, slug, reason


def audio(opus: bytes) -> bytes:
    return bytes([Kind.AUDIO]) + opus


def text(piece: str) -> bytes:
    return bytes([Kind.TEXT]) + piece.encode("utf-8")


def control(action: Control) -> bytes:
    return bytes([Kind.CONTROL, action])


def metadata(data: dict[str, tp.Any]) -> bytes:
    return bytes([Kind.METADATA]) + json.dumps(data).encode("utf-8")


def error(reason: str) -> bytes:
    return bytes([Kind.ERROR]) + reason.encode("utf-8")


def parse_client_message(data: bytes) -> tuple[Kind, bytes] | None:
    """(kind, payload) of a client's binary message; None for kinds this protocol does not define
    (the protocol says to discard them). Raises ProtocolError for what a client must not send."""
    if not data:
        raise ProtocolError(Close.POLICY_VIOLATION, "empty", "empty message")
    try:
        kind = Kind(data[0])
    except ValueError:
        return None
    if kind in SERVER_ONLY:
        raise ProtocolError(Close.POLICY_VIOLATION, "wrong_kind", f"clients may not send {kind.name.lower()} messages")
    payload = data[1:]
    if kind == Kind.CONTROL:
        if len(payload) != 1 or payload[0] not in CONTROL_VALUES:
            raise ProtocolError(Close.INVALID_PAYLOAD, "bad_control", "control messages carry one known action byte")
    elif kind == Kind.PING and payload:
        raise ProtocolError(Close.INVALID_PAYLOAD, "bad_ping", "ping messages have no payload")
    return kind, payload


def parse_seed(value: str | None) -> int | None:
    """The ?seed= query value as an int in [0, 2**63), None if absent; ProtocolError otherwise."""
    if value is None:
        return None
    if not _SEED_PATTERN.fullmatch(value) or int(value) > SEED_MAX:
        raise ProtocolError(Close.POLICY_VIOLATION, "bad_seed", "seed must be an integer in [0, 2**63)")
    return int(value)


def check_token(value: str) -> str:
    """A resume token exactly as `secrets.token_urlsafe(32)` makes them; ProtocolError otherwise."""
    if not TOKEN_PATTERN.fullmatch(value):
        raise ProtocolError(Close.POLICY_VIOLATION, "bad_token", "malformed resume token")
    return value
