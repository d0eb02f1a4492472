"""`ttt-speech talk`: a headless client for Moshi's websocket protocol: send a wav, record the reply.

moshi's own client (`python -m moshi.client`) needs a sound card (it imports `sounddevice`, which needs
PortAudio); on a server without one, this sends a file instead of a microphone. The audio goes as 80 ms
Ogg/Opus frames (sphn, as moshi's client), the reply's audio and text pieces are written as they come.
A Moshi server steps once per input frame, so the reply is as long as the input; once the whole input
is sent, the client stops when the server has been quiet for `--linger` seconds.

Only aiohttp, numpy and sphn are imported (no torch, no model), so it runs on any machine with the
moshi extra.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import typing as tp
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit

import numpy as np

from ttt_speech.audio import FRAME_SIZE as FRAME  # one model step
from ttt_speech.audio import SAMPLE_RATE  # the protocol's Opus streams run at it
from ttt_speech.errors import UsageError, existing_file, positive_float
from ttt_speech.serve.protocol import Kind

CHAT_PATH = "/api/chat"


class TalkError(Exception):
    """The server could not be reached, refused the conversation or went silent; the message says which.
    (A bad --url or --wav is the user's: a UsageError, exit 2.)"""


@dataclass
class Reply:
    audio: np.ndarray  # float32 mono at SAMPLE_RATE
    pieces: list[str]  # the text pieces in the order they came
    frames_sent: int
    closed_by_server: str | None  # the server's ERROR text or close reason, when it ended the conversation

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def chat_url(url: str, seed: int | None = None) -> str:
    """ws://HOST:PORT (or http://...) -> the chat endpoint, with ?seed= when given (ttt-speech serve's
    per-conversation sampling seed; Moshi's own server ignores it)."""
    parts = urlsplit(url if "://" in url else f"ws://{url}")
    if parts.scheme not in ("ws", "wss", "http", "https") or not parts.hostname:
        raise UsageError(f"--url {url!r}: expected ws://HOST:PORT or wss://HOST[:PORT][/api/chat]")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    query = "&".join(q for q in (parts.query, urlencode({"seed": seed}) if seed is not None else "") if q)
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") or CHAT_PATH, query, ""))


def read_input(path: str | Path) -> np.ndarray:
    """Any audio file sphn reads -> float32 mono at SAMPLE_RATE, padded with silence to whole frames."""
    import sphn

    existing_file(path, "audio file (--wav)")
    try:
        pcm, _ = sphn.read(str(path), sample_rate=SAMPLE_RATE)
    except Exception as e:  # sphn raises plain exceptions for undecodable files
        raise UsageError(f"--wav {path}: cannot read it as audio ({e}); give a wav, flac, mp3 or ogg file") from None
    mono = pcm.mean(axis=0).astype(np.float32)
    if not len(mono):
        raise UsageError(f"--wav {path}: holds no audio; give a file with at least one sample")
    return np.pad(mono, (0, -len(mono) % FRAME))


async def talk(url: str, pcm: np.ndarray, realtime: bool = False, linger_s: float = 3.0,
               timeout_s: float = 30.0) -> Reply:
    """Stream `pcm` (float32 mono at SAMPLE_RATE, whole frames) to the server at `url` and collect its reply.

    realtime: send one frame per 80 ms, as a microphone would (default: as fast as the server reads them;
        a server reads at its own pace). timeout_s bounds every wait while input is still going out."""
    import aiohttp
    import sphn

    writer, reader = sphn.OpusStreamWriter(SAMPLE_RATE), sphn.OpusStreamReader(SAMPLE_RATE)
    audio: list[np.ndarray] = []
    pieces: list[str] = []
    ended: str | None = None

    async def send(ws: tp.Any) -> int:
        start = time.monotonic()
        frames = pcm.reshape(-1, FRAME)
        for i, block in enumerate(frames):
            if realtime:
                await asyncio.sleep(max(0.0, start + i * FRAME / SAMPLE_RATE - time.monotonic()))
            data = writer.append_pcm(block)
            if len(data):
                await ws.send_bytes(bytes([Kind.AUDIO]) + data)
        return len(frames)

    try:
        async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=0) as ws:
            try:
                first = await ws.receive(timeout=timeout_s)
            except asyncio.TimeoutError:
                raise TalkError(f"{url}: no handshake within {timeout_s:g} s; is it a Moshi-protocol server?") from None
            if first.type != aiohttp.WSMsgType.BINARY or first.data[:1] != bytes([Kind.HANDSHAKE]):
                reason = first.data[1:].decode(errors="replace") if first.type == aiohttp.WSMsgType.BINARY else ""
                raise TalkError(f"{url}: the server did not start a conversation"
                                f"{': ' + reason if reason else f' (close code {ws.close_code})'}")
            sender = asyncio.create_task(send(ws))
            try:
                while True:
                    wait = linger_s if sender.done() else timeout_s
                    try:
                        msg = await ws.receive(timeout=wait)
                    except asyncio.TimeoutError:
                        if sender.done():
                            break
                        raise TalkError(f"{url}: no message for {timeout_s:g} s while sending") from None
                    if msg.type == aiohttp.WSMsgType.CLOSE:  # the server ended it (an ERROR message said why)
                        ended = ended or msg.extra or f"close code {msg.data}"
                        break
                    if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        ended = ended or "connection lost"
                        break
                    if msg.type != aiohttp.WSMsgType.BINARY:
                        continue
                    kind, payload = msg.data[0], msg.data[1:]
                    if kind == Kind.AUDIO:
                        audio.append(reader.append_bytes(payload))
                    elif kind == Kind.TEXT:
                        pieces.append(payload.decode("utf-8", errors="replace"))
                    elif kind == Kind.ERROR:
                        ended = payload.decode("utf-8", errors="replace")
            finally:
                if not sender.done():
                    sender.cancel()
                frames_sent = (await asyncio.gather(sender, return_exceptions=True))[0]
    except aiohttp.ClientError as e:
        raise TalkError(f"{url}: {e}") from None
    if not isinstance(frames_sent, int):  # the connection broke while sending
        raise TalkError(f"{url}: the conversation ended while sending: {ended or frames_sent}")
    out = np.concatenate(audio) if audio else np.zeros(0, np.float32)
    return Reply(out.astype(np.float32), pieces, frames_sent, ended)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="ws://127.0.0.1:8998",
                   help="the server: ws://HOST:PORT (path /api/chat added) or a full ws:// / wss:// URL")
    p.add_argument("--wav", required=True, help="what to say: an audio file (any rate and channel count; "
                                                "resampled to 24 kHz mono)")
    p.add_argument("--out", required=True, help="the reply's audio, a 24 kHz mono wav")
    p.add_argument("--text", help="also write the reply's text here")
    p.add_argument("--seed", type=int, help="sampling seed of the conversation (ttt-speech serve)")
    p.add_argument("--realtime", action="store_true", help="send at real time (80 ms per frame) instead of "
                                                           "as fast as the server reads")
    p.add_argument("--linger", type=positive_float, default=3.0,
                   help="seconds of server silence, after the whole input is sent, that end the conversation")
    p.add_argument("--timeout", type=positive_float, default=30.0, help="longest wait for the server while sending")


def run(args: argparse.Namespace) -> int:
    """Talk once; 0 on a reply, 1 (one line on stderr) when the server cannot be reached or refuses."""
    import sphn

    pcm, url = read_input(args.wav), chat_url(args.url, args.seed)
    try:
        reply = asyncio.run(talk(url, pcm, args.realtime, args.linger, args.timeout))
    except TalkError as e:
        print(f"talk: {e}", file=sys.stderr)
        return 1
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sphn.write_wav(str(args.out), reply.audio, SAMPLE_RATE)
    if args.text:
        Path(args.text).write_text(reply.text + "\n", encoding="utf-8")
    ended = f"; the server ended it: {reply.closed_by_server}" if reply.closed_by_server else ""
    print(f"sent {reply.frames_sent} frames ({len(pcm) / SAMPLE_RATE:.2f} s), got {len(reply.audio) / SAMPLE_RATE:.2f} s "
          f"of audio and {len(reply.pieces)} text pieces -> {args.out}{ended}", file=sys.stderr)
    return 0
