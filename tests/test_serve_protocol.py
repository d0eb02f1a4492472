"""Moshi's message framing as the server parses it, and the store of kept conversations: tokens are
unguessable and strictly checked, client input never becomes a path, files are single-use, private,
and refused when they belong to another model or are damaged."""

from __future__ import annotations

import os
import secrets
import stat
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("moshi")

from ttt_speech.serve import protocol  # noqa: E402
from ttt_speech.serve.protocol import Close, Control, Kind, ProtocolError  # noqa: E402
from ttt_speech.serve.store import StateStore  # noqa: E402


def slug(fn, *args) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(ProtocolError) as e:
        fn(*args)
    return e.value.slug


def test_client_messages_are_parsed_strictly() -> None:
    assert protocol.parse_client_message(b"\x01OggS...") == (Kind.AUDIO, b"OggS...")
    assert protocol.parse_client_message(protocol.control(Control.SUSPEND)) == (Kind.CONTROL, b"\x10")
    assert protocol.parse_client_message(b"\x06") == (Kind.PING, b"")
    for action in Control:
        assert protocol.parse_client_message(protocol.control(action)) is not None
    assert slug(protocol.parse_client_message, b"") == "empty"
    for kind in (Kind.HANDSHAKE, Kind.TEXT, Kind.METADATA, Kind.ERROR):  # what only a server sends
        assert slug(protocol.parse_client_message, bytes([kind]) + b"x") == "wrong_kind"
    for bad in (b"\x03", b"\x03\x10\x10", b"\x03\x04", b"\x03\xff"):
        assert slug(protocol.parse_client_message, bad) == "bad_control"
    assert slug(protocol.parse_client_message, b"\x06x") == "bad_ping"
    assert all(protocol.parse_client_message(bytes([k, 1, 2])) is None for k in range(7, 256))  # discarded
    assert protocol.HANDSHAKE == b"\x00" + bytes(8)  # kind 0, protocol version u32 0, model u32 0


def test_tokens_and_seeds_are_checked_before_use() -> None:
    for _ in range(200):
        token = secrets.token_urlsafe(32)
        assert protocol.check_token(token) == token
    for bad in ("../" + "a" * 40, "a" * 42, "a" * 44, "a" * 42 + "/", "a" * 42 + ".", "a" * 42 + "\0",
                "a" * 42 + "é", "%2e%2e%2f" + "a" * 34, " " + "a" * 42, "a" * 42 + "\n", ""):
        assert slug(protocol.check_token, bad) == "bad_token"
    assert protocol.parse_seed(None) is None
    assert protocol.parse_seed("0") == 0 and protocol.parse_seed(str(2**63 - 1)) == 2**63 - 1
    for bad in (str(2**63), "-1", "1e3", "", "\u00b2", "1" * 20, " 1", "0x10"):
        assert slug(protocol.parse_seed, bad) == "bad_seed"


def tensors() -> dict[str, torch.Tensor]:
    return {"lm.kv": torch.arange(12.0).view(3, 4), "gen.offsets": torch.tensor(37)}


def test_store_saves_private_single_use_files_named_by_token(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "kept", "fp-1")
    token = store.save(tensors(), {"frames": "37"})
    assert protocol.TOKEN_PATTERN.fullmatch(token)
    files = list((tmp_path / "kept").iterdir())
    assert files == [tmp_path / "kept" / f"{token}.safetensors"]
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    got, meta = store.take(token)
    assert meta["frames"] == "37" and meta["fingerprint"] == "fp-1"
    for name, t in tensors().items():
        torch.testing.assert_close(got[name], t, rtol=0, atol=0)
    assert not list((tmp_path / "kept").iterdir())
    assert slug(store.take, token) == "unknown_token"  # used up
    assert slug(store.take, secrets.token_urlsafe(32)) == "unknown_token"


def test_store_expires_what_no_client_came_back_for(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "kept", "fp-1", max_files=2, max_age_s=3600)
    old, fresh = store.save(tensors(), {"frames": "1"}), store.save(tensors(), {"frames": "2"})
    crashed = tmp_path / "kept" / f"{secrets.token_urlsafe(32)}.tmp"  # a save a crash cut short
    crashed.write_bytes(b"half")
    (tmp_path / "kept" / "notes.txt").write_text("not the store's")
    hour_ago = time.time() - 3601
    for path in (tmp_path / "kept" / f"{old}.safetensors", crashed, tmp_path / "kept" / "notes.txt"):
        os.utime(path, (hour_ago, hour_ago))
    third = store.save(tensors(), {"frames": "3"})  # the store was full; the expired one made room
    assert slug(store.take, old) == "unknown_token"
    assert not crashed.exists() and (tmp_path / "kept" / "notes.txt").exists()
    assert store.take(fresh)[1]["frames"] == "2" and store.take(third)[1]["frames"] == "3"
    with pytest.raises(ValueError, match="keeps >= 1 file for > 0 s"):
        StateStore(tmp_path / "kept", "fp-1", max_age_s=0)


def test_store_never_reads_outside_its_directory_or_foreign_files(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "kept", "fp-1", max_files=2)
    outside = StateStore(tmp_path, "fp-1").save(tensors(), {"frames": "1"})  # a valid file one level up
    assert slug(store.take, "../" + outside) == "bad_token"
    assert slug(store.take, str(tmp_path / outside)) == "bad_token"
    assert (tmp_path / f"{outside}.safetensors").exists()
    foreign = StateStore(tmp_path / "kept", "fp-2").save(tensors(), {"frames": "1"})
    assert slug(store.take, foreign) == "foreign_state"
    damaged = store.save(tensors(), {"frames": "1"})
    path = tmp_path / "kept" / f"{damaged}.safetensors"
    path.write_bytes(path.read_bytes()[:40])
    assert slug(store.take, damaged) == "corrupt_state"
    assert not list((tmp_path / "kept").iterdir())  # refused files are gone too
    store.save(tensors(), {"frames": "1"})
    store.save(tensors(), {"frames": "1"})
    with pytest.raises(ProtocolError) as full:
        store.save(tensors(), {"frames": "1"})
    assert (full.value.slug, full.value.code) == ("store_full", Close.TRY_AGAIN_LATER)
