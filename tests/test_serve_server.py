"""The server end to end, as a separate process on loopback (`python -m ttt_speech.serve.commands`)
with a tiny TTT hybrid, tiny Mimi and tokenizer written in Moshi's checkpoint format:

- moshi's own client (moshi.client.run + Connection, unchanged; only its sound device is simulated)
  streams 30 s of audio and gets the audio and text back;
- suspend / resume over the wire, with checks that the tokens are single-use and never paths;
- refusal beyond --max-sessions; malformed, wrong-kind, oversized messages and clients vanishing
  mid-frame each end only their own session while a healthy one keeps streaming, and the server's
  memory comes back;
- /health and /metrics.

The tests that code audio run twice: Opus on the server's event loop (--opus-workers 0) and in two
worker processes (2), where a killed worker ends only its own session and shutdown leaves no process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib
import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import types
import typing as tp
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

moshi = pytest.importorskip("moshi")
aiohttp = pytest.importorskip("aiohttp")
sphn = pytest.importorskip("sphn")  # not on the GPU device image (serve tests run on CI)
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from helpers.serve import listening_mimi  # noqa: E402

import ttt_speech  # noqa: E402
from ttt_speech.moshi.tiny import (  # noqa: E402
    MIMI_CONFIG_NAME,
    MIMI_WEIGHTS_NAME,
    TOKENIZER_NAME,
    build_tiny_hybrid,
    tiny_mimi_config,
    write_tiny_tokenizer,
)
from ttt_speech.serve import protocol  # noqa: E402
from ttt_speech.serve.protocol import Close, Control, Kind  # noqa: E402

MAX_SESSIONS = 4
MAX_MESSAGE = 1 << 16
IDLE_S = 4.0
SR, FRAME = 24000, 1920
DELAY = 1  # the tiny model's acoustic delay: a fresh session's first frame yields no audio
WAIT_S = 30.0  # bound on every wait; nothing here should take more than a few seconds


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    root: Path
    opus_workers: int

    @property
    def states(self) -> Path:
        return self.root / "states"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def rss(self) -> int:
        return int(Path(f"/proc/{self.proc.pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def children(self) -> list[int]:
        """Pids of the server's child processes (Opus workers, multiprocessing's resource tracker)."""
        return [int(p) for p in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()]

    def opus_workers_pids(self) -> list[int]:
        return [p for p in self.children() if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


BOTH = pytest.mark.parametrize("server", [0, 2], indirect=True, ids=["opus-on-loop", "opus-workers"])
LOOP = pytest.mark.parametrize("server", [0], indirect=True, ids=["opus-on-loop"])  # the same server as BOTH's first


def write_model_dir(root: Path) -> Path:
    """A hybrid checkpoint directory as convert-moshi writes it, plus Mimi and a tokenizer beside it."""
    lm = build_tiny_hybrid(0)
    lm.save_pretrained(root)
    mimi = listening_mimi(0)
    save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, str(root / MIMI_WEIGHTS_NAME))
    (root / MIMI_CONFIG_NAME).write_text(json.dumps(tiny_mimi_config(2, lm.card)))
    write_tiny_tokenizer(root / TOKENIZER_NAME, lm.text_card)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> tp.Iterator[Server]:
    workers = getattr(request, "param", 0)
    root = tmp_path_factory.mktemp(f"serve{workers}")
    model = write_model_dir(root / "model")
    log = root / "server.log"
    env = dict(os.environ, PYTHONPATH=str(Path(ttt_speech.__file__).parents[1]), OMP_NUM_THREADS="1",
               NO_TORCH_COMPILE="1", HF_HUB_OFFLINE="1")
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ttt_speech.serve.commands", "--model", str(model), "--host", "127.0.0.1",
             "--port", "0", "--max-sessions", str(MAX_SESSIONS), "--state-dir", str(root / "states"),
             "--max-message-bytes", str(MAX_MESSAGE), "--idle-timeout", str(IDLE_S), "--shutdown-after", "600",
             "--max-load", "off", "--opus-workers", str(workers)],  # a busy test host must not refuse sessions here (test_serve_admission.py)
            stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while not (m := re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        yield (started := Server(proc, int(m.group(1)), root, workers))
        children = started.children()
        assert len(started.opus_workers_pids()) == workers
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0, log.read_text()[-3000:]  # SIGTERM: sessions closed, clean exit
    deadline = time.monotonic() + 10
    while not all(gone(p) for p in children):  # the resource tracker leaves once the server has
        assert time.monotonic() < deadline, f"processes left behind: {[p for p in children if not gone(p)]}"
        time.sleep(0.05)


async def metrics(server: Server) -> dict[str, float]:
    """/metrics as {name or name{labels}: value}."""
    async with aiohttp.ClientSession() as http, http.get(server.url("/metrics")) as r:
        assert r.status == 200
        text = await r.text()
    return {line.rsplit(" ", 1)[0].removeprefix("ttt_serve_"): float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


async def wait_sessions(server: Server, n: int) -> dict[str, float]:
    deadline = time.monotonic() + WAIT_S
    while (m := await metrics(server))["sessions"] != n:
        assert time.monotonic() < deadline, f"sessions stuck at {m['sessions']}, expected {n}"
        await asyncio.sleep(0.05)
    return m


def ended(m: dict[str, float]) -> Counter[str]:
    return Counter({k[len('sessions_ended_total{reason="'):-2]: int(v)
                    for k, v in m.items() if k.startswith("sessions_ended_total{")})


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """Chirps under a syllable-rate envelope: loud and quiet stretches, changing pitch."""
    t = np.arange(int(seconds * SR)) / SR
    rng = np.random.default_rng(seed)
    pitch = 120 + 80 * np.sin(2 * np.pi * 0.3 * t)
    env = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) * (rng.uniform(0, 1, len(t) // FRAME + 1).repeat(FRAME)[:len(t)] > 0.2)
    return (0.3 * env * np.sin(2 * np.pi * np.cumsum(pitch) / SR)).astype(np.float32)


# -- moshi's own client ----------------------------------------------------------------------
class FakeSoundDevice:
    """Stands in for the `sounddevice` module (not installed; no sound card here). moshi's client opens
    an InputStream and an OutputStream with callbacks; these call them from threads every `period_s`,
    feeding `source` block by block and recording what the client plays."""

    def __init__(self, source: np.ndarray, period_s: float) -> None:
        self.source, self.period_s = source, period_s
        self.fed_at: list[float] = []
        self.played: list[np.ndarray] = []
        self.played_at: list[float] = []
        self.module = types.ModuleType("sounddevice")
        self.module.InputStream = self._stream(self._feed)  # type: ignore[attr-defined]
        self.module.OutputStream = self._stream(self._play)  # type: ignore[attr-defined]

    def _stream(self, body: tp.Callable[..., None]) -> type:
        class Stream:
            def __init__(self, samplerate: float, channels: int, blocksize: int, callback: tp.Callable) -> None:
                assert samplerate == SR and channels == 1 and blocksize == FRAME
                self.stop = threading.Event()
                self.thread = threading.Thread(target=body, args=(callback, self.stop), daemon=True)

            def __enter__(self) -> Stream:
                self.thread.start()
                return self

            def __exit__(self, *exc: object) -> None:
                self.stop.set()
                self.thread.join(5)

        return Stream

    def _feed(self, callback: tp.Callable, stop: threading.Event) -> None:
        for block in self.source.reshape(-1, FRAME):
            if stop.is_set():
                return
            callback(block[:, None].copy(), FRAME, None, None)
            self.fed_at.append(time.monotonic())
            stop.wait(self.period_s)

    def _play(self, callback: tp.Callable, stop: threading.Event) -> None:
        while not stop.wait(self.period_s):
            out = np.zeros((FRAME, 1), np.float32)
            callback(out, FRAME, None, None)
            self.played.append(out[:, 0].copy())
            self.played_at.append(time.monotonic())


class Pieces(io.StringIO):
    """The printer's token stream, keeping each printed piece."""

    def __init__(self) -> None:
        super().__init__()
        self.pieces: list[str] = []

    def write(self, s: str) -> int:
        self.pieces.append(s)
        return super().write(s)


@pytest.fixture
def moshi_client(monkeypatch: pytest.MonkeyPatch) -> tp.Iterator[tuple[types.ModuleType, FakeSoundDevice]]:
    """moshi.client, imported against a simulated sound device playing 30 s of speech-like audio at
    ~7x real time; removed again afterwards so no other test sees it."""
    device = FakeSoundDevice(speech_like(30), period_s=0.012)
    monkeypatch.setitem(sys.modules, "sounddevice", device.module)
    sys.modules.pop("moshi.client", None)
    try:
        yield importlib.import_module("moshi.client"), device
    finally:
        sys.modules.pop("moshi.client", None)
        if hasattr(moshi, "client"):
            del moshi.client


@LOOP
def test_moshi_client_streams_30s_and_gets_audio_and_text_back(
        server: Server, moshi_client: tuple[types.ModuleType, FakeSoundDevice]) -> None:
    client, device = moshi_client
    seconds = 30
    frames = seconds * SR // FRAME  # 375
    tokens, errors = Pieces(), io.StringIO()
    printer = client.RawPrinter(stream=tokens, err_stream=errors)
    lags = lambda: errors.getvalue().count("[LAG]")  # noqa: E731  moshi's client plays zeros then

    async def main() -> dict[str, float]:
        before = await metrics(server)
        args = types.SimpleNamespace(host="127.0.0.1", port=server.port, https=False, url=None)
        task = asyncio.create_task(client.run(printer, args))
        deadline = time.monotonic() + WAIT_S
        while len(device.played) - lags() < frames - DELAY:
            assert not task.done() and time.monotonic() < deadline, errors.getvalue()[-2000:]
            await asyncio.sleep(0.05)
        task.cancel()  # the user stops the client
        with contextlib.suppress(asyncio.CancelledError):
            await task
        after = await wait_sessions(server, 0)
        assert after["frames_total"] - before["frames_total"] == frames
        assert ended(after)["client_left"] - ended(before)["client_left"] == 1
        return after

    t0 = time.monotonic()
    asyncio.run(main())
    wall = time.monotonic() - t0
    received = [p for p in device.played if p.any()]
    assert len(device.played) - len(received) == lags()  # silent blocks are exactly moshi's lag fills
    audio = np.concatenate(received)
    assert len(received) == frames - DELAY  # every frame came back, as 80 ms of audio
    assert np.sqrt(np.mean(audio**2)) > 1e-3 and np.isfinite(audio).all()
    first_out = next(t for t, p in zip(device.played_at, device.played) if p.any())
    assert first_out < device.fed_at[-1] - 1.0  # full duplex: output flowed while input was streaming
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(server.root / "model" / TOKENIZER_NAME))
    vocab = {sp.id_to_piece(i).replace("\u2581", " ") for i in range(sp.vocab_size())} - {"<end_pad>", "<pad>"}
    assert len(tokens.pieces) > (frames - DELAY) // 2 and set(tokens.pieces) <= vocab
    print(f"moshi client: {len(received)} frames back ({len(audio) / SR:.2f} s), {len(tokens.pieces)} text "
          f"pieces, {lags()} lags, {wall:.1f} s wall for {seconds} s of audio")


# -- a minimal protocol client, for what moshi's client does not do -------------------------
class Client:
    """aiohttp + sphn, sending 80 ms Opus frames; collects what the server sends until it closes."""

    def __init__(self, ws: tp.Any) -> None:
        self.ws = ws
        self.opus = sphn.OpusStreamWriter(SR)
        self.audio = 0
        self.messages: list[tuple[Kind, bytes]] = []

    @classmethod
    async def connect(cls, http: tp.Any, server: Server, query: str = "") -> Client:
        client = cls(await http.ws_connect(server.url("/api/chat" + query), max_msg_size=0))
        await client.read(1)
        return client

    @property
    def ready(self) -> bool:
        return bool(self.messages) and self.messages[0] == (Kind.HANDSHAKE, protocol.HANDSHAKE[1:])

    def of(self, kind: Kind) -> list[bytes]:
        return [payload for k, payload in self.messages if k == kind]

    async def read(self, n: int | None = None) -> bool:
        """Read n messages (None: until the server closes); False once the connection is closed."""
        while n is None or n > 0:
            msg = await self.ws.receive(timeout=WAIT_S)
            if msg.type != aiohttp.WSMsgType.BINARY:
                return False
            kind = Kind(msg.data[0])
            self.audio += kind == Kind.AUDIO
            self.messages.append((kind, msg.data[1:]))
            n = None if n is None else n - 1
        return True

    async def send_frames(self, pcm: np.ndarray) -> None:
        for block in pcm.reshape(-1, FRAME):
            data = self.opus.append_pcm(block)
            if data:
                await self.ws.send_bytes(protocol.audio(data))

    async def suspend(self) -> dict[str, tp.Any]:
        await self.ws.send_bytes(protocol.control(Control.SUSPEND))
        await self.read()
        assert self.ws.close_code == Close.NORMAL, (self.ws.close_code, self.messages[-3:])
        return json.loads(self.of(Kind.METADATA)[-1])

    async def refused(self) -> tuple[int, str]:
        """(close code, error text) of a connection the server ends."""
        await self.read()
        errors = self.of(Kind.ERROR)
        return self.ws.close_code, errors[-1].decode() if errors else ""


@BOTH
def test_suspend_and_resume_over_the_wire(server: Server) -> None:
    async def main() -> None:
        async with aiohttp.ClientSession() as http:
            first = await Client.connect(http, server, "?seed=9")
            assert first.ready
            await first.send_frames(speech_like(40 * FRAME / SR, seed=1))
            kept = await first.suspend()
            assert kept["frames"] == 40 and first.audio == 40 - DELAY
            token = kept["resume_token"]
            path = server.states / f"{token}.safetensors"
            assert protocol.TOKEN_PATTERN.fullmatch(token) and list(server.states.iterdir()) == [path]
            with safe_open(str(path), framework="pt") as f:
                assert f.metadata()["frames"] == "40"
                assert f.get_tensor("gen.offsets").item() == 40 and f.get_tensor("gen.seeds").item() == 9
                assert any(".memory.W1" in k for k in f.keys()) and any(".kv_cache.cache" in k for k in f.keys())

            again = await Client.connect(http, server, f"?resume={token}")
            assert again.ready
            await again.read(1)
            assert json.loads(again.of(Kind.METADATA)[0]) == {"resumed": True, "frames": 40}
            await again.send_frames(speech_like(20 * FRAME / SR, seed=2))
            kept2 = await again.suspend()
            # a resumed generator is past its acoustic delay: all 20 frames give audio (a new one: 19)
            assert kept2["frames"] == 60 and again.audio == 20
            assert not path.exists() and kept2["resume_token"] != token

            before = ended(await metrics(server))
            for query in (f"?resume={token}", "?resume=../" + token[3:], f"?resume={server.states / token}",
                          "?seed=-4"):
                c = await Client.connect(http, server, query)
                code, text = await c.refused()
                assert not c.ready and code == Close.POLICY_VIOLATION and text, (query, code, text)
            refusals = ended(await metrics(server)) - before
            assert refusals == Counter(unknown_token=1, bad_token=2, bad_seed=1)
            last = await Client.connect(http, server, f"?resume={kept2['resume_token']}")
            assert last.ready
            await last.ws.close()
        m = await wait_sessions(server, 0)
        assert m["kept_conversations"] == 0 and m["sessions_resumed_total"] >= 2

    asyncio.run(main())


@BOTH
def test_refuses_sessions_beyond_max_sessions(server: Server) -> None:
    async def main() -> None:
        async with aiohttp.ClientSession() as http:
            before = ended(await metrics(server))
            clients = [await Client.connect(http, server) for _ in range(MAX_SESSIONS)]
            assert all(c.ready for c in clients)
            extra = await Client.connect(http, server)
            code, text = await extra.refused()
            assert not extra.ready and code == Close.TRY_AGAIN_LATER and "server full" in text
            for c in clients:  # the others are untouched: 2 frames in, 1 frame of audio out
                await c.send_frames(speech_like(2 * FRAME / SR))
            for c in clients:
                await c.read(1)
                assert c.audio == 1
                await c.ws.close()
            await wait_sessions(server, 0)
            retry = await Client.connect(http, server)
            assert retry.ready
            await retry.ws.close()
            after = ended(await wait_sessions(server, 0))
            assert after - before == Counter(server_full=1, client_left=MAX_SESSIONS + 1)

    asyncio.run(main())


# -- misbehaving clients ---------------------------------------------------------------------
def masked_frame(payload: bytes, opcode: int = 2) -> bytes:
    """A client-to-server websocket frame (RFC 6455: clients mask)."""
    n = len(payload)
    head = bytes([0x80 | opcode]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n))
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def vanish(server: Server, frames_before: int) -> None:
    """Open a session over a raw socket, stream some audio, then disappear in the middle of a frame
    (its header promises 1001 bytes, 40 arrive) with a TCP reset."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET /api/chat HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
    assert response.startswith(b"HTTP/1.1 101")
    handshake = await asyncio.wait_for(reader.readexactly(2 + len(protocol.HANDSHAKE)), WAIT_S)
    assert handshake == b"\x82\x09" + protocol.HANDSHAKE
    opus = sphn.OpusStreamWriter(SR)
    for block in speech_like(frames_before * FRAME / SR).reshape(-1, FRAME):
        writer.write(masked_frame(protocol.audio(opus.append_pcm(block))))
    writer.write(masked_frame(protocol.audio(b"x" * 1000))[:40])
    await writer.drain()
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


BAD_FRAMES: dict[str, tuple[Close, tp.Callable[[int], tp.Any]]] = {
    # metrics reason -> (close code the client must see, what to send on the i-th try)
    "empty": (Close.POLICY_VIOLATION, lambda i: b""),
    "wrong_kind": (Close.POLICY_VIOLATION, lambda i: bytes([(0, 2, 4, 5)[i % 4]]) + b"hello"),
    "text_frame": (Close.UNSUPPORTED_DATA, lambda i: "hello"),
    "bad_audio": (Close.INVALID_PAYLOAD, lambda i: protocol.audio(np.random.default_rng(i).bytes(27 + i % 300))),
    "bad_control": (Close.INVALID_PAYLOAD, lambda i: bytes([Kind.CONTROL, 0x20 + i % 200])),
    "too_big": (Close.MESSAGE_TOO_BIG, lambda i: protocol.audio(bytes(MAX_MESSAGE + i))),
}


async def bad_session(http: tp.Any, server: Server, reason: str, i: int) -> int:
    """Open a session, send one bad message; returns the close code the client saw."""
    client = await Client.connect(http, server)
    assert client.ready
    data = BAD_FRAMES[reason][1](i)
    await (client.ws.send_str(data) if isinstance(data, str) else client.ws.send_bytes(data))
    code, text = await client.refused()
    assert text or reason == "too_big"  # every other refusal says why before closing
    return code


@BOTH
def test_bad_frames_and_vanishing_clients_end_only_themselves(server: Server) -> None:
    per_reason, vanished = 100, 50  # 6 x 100 fatal bad frames + >= 400 unknown-kind ones, 50 vanishing clients

    async def storm(http: tp.Any, n: int) -> Counter[tuple[str, int]]:
        """n bad sessions per reason, two at a time (two slots stay with the healthy and noisy clients)."""
        seen: Counter[tuple[str, int]] = Counter()
        jobs = [(reason, i) for i in range(n) for reason in BAD_FRAMES]
        for k in range(0, len(jobs), 2):
            codes = await asyncio.gather(*(bad_session(http, server, r, i) for r, i in jobs[k:k + 2]))
            seen.update((r, c) for (r, _), c in zip(jobs[k:k + 2], codes))
        return seen

    async def main() -> None:
        async with aiohttp.ClientSession() as http:
            healthy = await Client.connect(http, server, "?seed=1")
            arrivals: list[float] = []
            sent = discarded = 0

            async def talk() -> None:  # real time: one frame per 80 ms, and read everything back
                nonlocal sent
                pcm = speech_like(120)
                reader = asyncio.create_task(read_forever())
                try:
                    while True:
                        await healthy.send_frames(pcm[sent * FRAME:(sent + 1) * FRAME])
                        sent += 1
                        await asyncio.sleep(0.08)
                finally:
                    reader.cancel()

            async def read_forever() -> None:
                n = healthy.audio
                while await healthy.read(1):
                    if healthy.audio > n:
                        arrivals.append(time.monotonic())
                    n = healthy.audio

            async def noise(stop: asyncio.Event) -> None:  # unknown kinds, discarded as moshi's protocol says
                nonlocal discarded
                while not stop.is_set() or discarded < 400:
                    await noisy.ws.send_bytes(bytes([7 + discarded % 249]) + b"?" * (discarded % 50))
                    discarded += 1
                    await asyncio.sleep(0.005)

            talker = asyncio.create_task(talk())
            noisy = await Client.connect(http, server)
            await storm(http, 3)  # warm-up: allocator pools and aiohttp buffers reach steady state
            for j in range(5):
                await vanish(server, frames_before=j)
                await wait_sessions(server, 2)  # its slot is back (with Opus workers it takes a few round trips)
            await wait_sessions(server, 2)
            m0, rss0 = await metrics(server), server.rss()

            t0 = time.monotonic()
            stop = asyncio.Event()
            noiser = asyncio.create_task(noise(stop))
            seen = await storm(http, per_reason)
            for j in range(vanished):
                await vanish(server, frames_before=(j % 2) * 3)  # half mid-conversation
                if j % 2:  # two slots are free for them
                    await wait_sessions(server, 2)
            stop.set()
            await noiser
            m1 = await wait_sessions(server, 2)
            storm_s = time.monotonic() - t0
            rss1 = server.rss()

            talker.cancel()
            await asyncio.gather(talker, return_exceptions=True)
            deadline = time.monotonic() + WAIT_S
            while healthy.audio < sent - DELAY:
                assert time.monotonic() < deadline and await healthy.read(1), (healthy.audio, sent)
            kept = await healthy.suspend()  # and it ends cleanly, with its conversation kept
            assert kept["frames"] == sent
            await noisy.ws.send_bytes(protocol.control(Control.PAUSE))  # still a working session
            await noisy.ws.close()
            assert noisy.ws.close_code == Close.NORMAL
            await wait_sessions(server, 0)

        expected = Counter({(r, code): per_reason for r, (code, _) in BAD_FRAMES.items()})
        assert seen == expected
        assert ended(m1) - ended(m0) == Counter({r: per_reason for r in BAD_FRAMES} | {"client_left": vanished})
        assert m1["discarded_messages_total"] - m0["discarded_messages_total"] == discarded >= 400
        gaps = np.diff([t for t in arrivals if t0 <= t <= t0 + storm_s])
        assert len(gaps) > 0.5 * storm_s * 12.5 and gaps.max() < 2.0, (len(gaps), gaps.max())
        growth = rss1 - rss0
        assert growth < 8 * 2**20, f"server RSS grew {growth / 2**20:.1f} MiB over {6 * per_reason + vanished} sessions"
        print(f"storm: {6 * per_reason} bad sessions + {discarded} discarded + {vanished} vanished in {storm_s:.1f} s; "
              f"healthy session: {len(gaps) + 1} frames back during it, max gap {gaps.max() * 1e3:.0f} ms; "
              f"server RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB")

    asyncio.run(main())


@LOOP
def test_idle_client_gives_its_slot_back(server: Server) -> None:
    async def main() -> float:
        async with aiohttp.ClientSession() as http:
            t0 = time.monotonic()
            idle = await Client.connect(http, server)
            assert idle.ready
            code, text = await idle.refused()
            waited = time.monotonic() - t0
            assert code == Close.POLICY_VIOLATION and "no message" in text
        await wait_sessions(server, 0)
        return waited

    waited = asyncio.run(main())
    assert IDLE_S <= waited < IDLE_S + 3, waited


@BOTH
def test_health_and_metrics(server: Server) -> None:
    async def main() -> None:
        async with aiohttp.ClientSession() as http:
            async with http.get(server.url("/health")) as r:
                assert r.status == 200
                assert await r.json() == {"status": "ok", "sessions": 0, "max_sessions": MAX_SESSIONS}
            c = await Client.connect(http, server)
            await c.send_frames(speech_like(25 * FRAME / SR))
            while c.audio < 25 - DELAY:  # every frame stepped (text messages come too)
                assert await c.read(1)
            m = await metrics(server)
            await c.ws.close()
        assert m["sessions"] == 1 and m["max_sessions"] == MAX_SESSIONS
        assert m["frames_per_second"] > 0 and 0 < m["real_time_factor"] < 1
        assert m["state_bytes"] == MAX_SESSIONS * m["state_bytes_per_session"] > 0
        assert m["rss_bytes"] > 0 and m["frames_total"] >= 25
        assert m["opus_workers"] == server.opus_workers

    asyncio.run(main())


@pytest.mark.parametrize("server", [2], indirect=True, ids=["opus-workers"])
def test_a_dead_opus_worker_ends_only_its_session(server: Server) -> None:
    async def main() -> None:
        async with aiohttp.ClientSession() as http:
            before = ended(await metrics(server))
            a, b = await Client.connect(http, server), await Client.connect(http, server)  # one per worker
            pcm = speech_like(10 * FRAME / SR)
            await asyncio.gather(a.send_frames(pcm), b.send_frames(pcm))
            await asyncio.gather(a.read(10 - DELAY), b.read(10 - DELAY))
            workers = server.opus_workers_pids()
            os.kill(workers[0], 9)
            await asyncio.gather(a.send_frames(pcm), b.send_frames(pcm), return_exceptions=True)
            closes = {asyncio.create_task(c.refused()): c for c in (a, b)}
            done, waiting = await asyncio.wait(closes, timeout=WAIT_S, return_when=asyncio.FIRST_COMPLETED)
            assert len(done) == 1 and [t.result() for t in done] == [
                (Close.INTERNAL_ERROR, "the server's audio worker stopped; reconnect")]
            survivor = closes[waiting.pop()]
            await asyncio.sleep(0.5)  # the survivor's connection stays open
            assert not survivor.ws.closed
            for t in closes:
                t.cancel()
            await asyncio.gather(*closes, return_exceptions=True)
            heard = survivor.audio
            await survivor.send_frames(pcm)
            while survivor.audio < heard + 5:
                assert await survivor.read(1)
            assert ended(await metrics(server)) - before == Counter({"opus_worker_lost": 1})
            replaced = server.opus_workers_pids()
            assert len(replaced) == 2 and workers[0] not in replaced and workers[1] in replaced
            fresh = await Client.connect(http, server)
            await fresh.send_frames(speech_like(5 * FRAME / SR))
            while fresh.audio < 5 - DELAY:
                assert await fresh.read(1)
            await asyncio.gather(survivor.ws.close(), fresh.ws.close())
            await wait_sessions(server, 0)

    asyncio.run(main())
