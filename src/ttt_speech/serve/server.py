"""The aiohttp application: /api/chat (Moshi's websocket protocol), /health and /metrics.

A connection's handler reads messages and feeds decoded audio to its session; a sender task writes
the session's queued output. Whatever goes wrong with one client (malformed or oversized messages,
wrong kinds, bad audio, vanishing mid-frame, not reading) ends that session only, with a close code
and a reason, and frees its slot at once.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import typing as tp

import torch
from aiohttp import WSMsgType, web

from ttt_speech.moshi.generate import rss_bytes
from ttt_speech.serve import protocol
from ttt_speech.serve.protocol import Close, Control, Kind, ProtocolError
from ttt_speech.serve.sessions import INTERNAL, Ending, Session, SessionManager

log = logging.getLogger("ttt_speech.serve")

MANAGER = web.AppKey("manager", SessionManager)
CLOSE_TIMEOUT_S = 2.0  # how long a close waits for the client's close frame


def build_app(manager: SessionManager) -> web.Application:
    app = web.Application()
    app[MANAGER] = manager
    app.router.add_get("/api/chat", chat)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.on_startup.append(_start)
    app.on_shutdown.append(_end_sessions)
    app.on_cleanup.append(_stop)
    return app


async def _start(app: web.Application) -> None:
    app[MANAGER].start()


async def _end_sessions(app: web.Application) -> None:
    for session in app[MANAGER].slots:
        if session is not None:
            session.end(Ending(Close.GOING_AWAY, "shutdown", "server shutting down"), flush=False)


async def _stop(app: web.Application) -> None:
    await app[MANAGER].stop()


async def _close(ws: web.WebSocketResponse, ending: Ending) -> None:
    if ws.closed:
        return
    try:
        if ending.notify:
            await ws.send_bytes(protocol.error(ending.reason))
        await ws.close(code=ending.code, message=ending.reason.encode()[:123])
    except ConnectionError:
        pass


async def _send(ws: web.WebSocketResponse, session: Session) -> None:
    """Write the session's output until its ending, which closes the connection."""
    try:
        while True:
            item = await session.outbox.get()
            if isinstance(item, Ending):
                await _close(ws, item)
                return
            await ws.send_bytes(item)
    except ConnectionError:  # the client is gone; the receiving side notices too
        return


async def _open(manager: SessionManager, query: tp.Mapping[str, str]) -> Session:
    token = query.get("resume")
    if token is not None:
        session = await manager.resume(protocol.check_token(token))
        session.outbox.put_nowait(protocol.HANDSHAKE)
        session.outbox.put_nowait(protocol.metadata({"resumed": True, "frames": session.frames}))
        return session
    seed = protocol.parse_seed(query.get("seed"))
    session = await manager.open(secrets.randbits(63) if seed is None else seed)
    session.outbox.put_nowait(protocol.HANDSHAKE)
    return session


async def _receive(ws: web.WebSocketResponse, manager: SessionManager, session: Session) -> Ending | None:
    """Handle the client's messages; returns how the session ends (None: the client left)."""
    try:
        return await _receive_messages(ws, manager, session)
    except asyncio.TimeoutError:
        idle = manager.limits.idle_timeout_s
        return Ending(Close.POLICY_VIOLATION, "idle", f"no message for {idle:g} s")


async def _receive_messages(ws: web.WebSocketResponse, manager: SessionManager, session: Session) -> Ending | None:
    async for msg in ws:
        if msg.type == WSMsgType.ERROR:
            if getattr(msg.data, "code", None) == Close.MESSAGE_TOO_BIG:  # aiohttp already closed with 1009
                return Ending(Close.MESSAGE_TOO_BIG, "too_big", "message too big", notify=False)
            return None
        if msg.type == WSMsgType.TEXT:
            raise ProtocolError(Close.UNSUPPORTED_DATA, "text_frame", "text frames are not part of the protocol")
        if msg.type != WSMsgType.BINARY:
            continue
        parsed = protocol.parse_client_message(msg.data)
        if parsed is None:
            manager.metrics.discarded += 1
            continue
        kind, payload = parsed
        if kind == Kind.AUDIO:
            await manager.feed(session, await session.decode(payload))
        elif kind == Kind.CONTROL and payload[0] == Control.SUSPEND:
            token = await manager.suspend(session)
            session.outbox.put_nowait(protocol.metadata({"resume_token": token, "frames": session.frames}))
            return Ending(Close.NORMAL, "suspended", "conversation kept", notify=False)
        # moshi's other controls and pings mean nothing in full-duplex streaming
    return None


def _receiver_ending(receiver: asyncio.Task[Ending | None]) -> tuple[Ending | None, bool]:
    """How a finished receive loop ends the session, and whether queued output is still sent."""
    e = receiver.exception()
    if isinstance(e, ProtocolError):
        return Ending.of(e), False
    if e is not None:
        log.error("session failed", exc_info=e)
        return INTERNAL, False
    ending = receiver.result()
    return ending, ending is not None and ending.slug == "suspended"


async def chat(request: web.Request) -> web.WebSocketResponse:
    manager = request.app[MANAGER]
    limits = manager.limits
    ws = web.WebSocketResponse(max_msg_size=limits.max_message_bytes or 0, timeout=CLOSE_TIMEOUT_S,  # 0: no limit
                               receive_timeout=limits.idle_timeout_s)
    await ws.prepare(request)
    try:
        session = await _open(manager, request.query)
    except Exception as e:  # refused (server full, bad seed or token) or failed
        ending = Ending.of(e) if isinstance(e, ProtocolError) else INTERNAL
        if ending is INTERNAL:
            log.exception("opening a session failed")
        manager.metrics.ended[ending.slug] += 1
        await _close(ws, ending)
        return ws
    receiver = asyncio.create_task(_receive(ws, manager, session))
    sender = asyncio.create_task(_send(ws, session))
    ended = asyncio.create_task(session.ended.wait())  # the engine may end it (slow client, failure, shutdown)
    try:
        await asyncio.wait({receiver, sender, ended}, return_when=asyncio.FIRST_COMPLETED)
        if receiver.done():
            ending, flush = _receiver_ending(receiver)
            if ending is not None:
                session.end(ending, flush)
    finally:
        manager.release(session, session.ending.slug if session.ending else "client_left")
        receiver.cancel()
        ended.cancel()
        if session.ending is None:
            sender.cancel()
        # the sender delivers the ending (and, for a suspend, the last output); a client that does not
        # read gets its connection cut instead
        await asyncio.wait({sender}, timeout=2 * CLOSE_TIMEOUT_S)
        if not sender.done():
            sender.cancel()
            if request.transport is not None:
                request.transport.abort()
        await asyncio.gather(receiver, sender, ended, return_exceptions=True)
    return ws


async def health(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    body = {"status": "ok" if manager.healthy else "engine stopped",
            "sessions": manager.sessions, "max_sessions": len(manager.slots)}
    return web.json_response(body, status=200 if manager.healthy else 503)


def render_metrics(manager: SessionManager) -> str:
    """Prometheus text exposition of the server's gauges and counters."""
    m = manager.metrics
    fps, rtf = m.rates()
    rows: list[tuple[str, str, str, list[tuple[str, float]]]] = [
        ("sessions", "gauge", "sessions connected now", [("", manager.sessions)]),
        ("max_sessions", "gauge", "sessions one batched step serves", [("", len(manager.slots))]),
        ("frames_total", "counter", "session frames stepped (80 ms each)", [("", m.frames_total)]),
        ("steps_total", "counter", "batched steps", [("", m.steps_total)]),
        ("frames_per_second", "gauge", f"session frames stepped per second over {m.window_s:g} s", [("", fps)]),
        ("real_time_factor", "gauge", "mean batched step time / frame duration (< 1: sessions keep real time)",
         [("", rtf)]),
        ("step_p90_seconds", "gauge", f"p90 of the batched step over {m.window_s:g} s (new sessions are refused "
                                      "at or above the admission budget)", [("", m.step_p90()[0])]),
        ("state_bytes_per_session", "gauge", "fixed streaming state of one session (KV windows, TTT, Mimi)",
         [("", manager.streams.slot_bytes)]),
        ("state_bytes", "gauge", "streaming state held for all slots",
         [("", manager.streams.slot_bytes * len(manager.slots))]),
        ("opus_workers", "gauge", "processes Opus-coding the sessions' audio (0: the event loop)",
         [("", manager.opus.workers)]),
        ("opus_busy_fraction", "gauge", f"Opus-coding time per frame stepped over {m.window_s:g} s, of the coder "
                                        "a new session would join, as a fraction of the frame (new sessions are "
                                        "refused where one more would reach the admission budget)",
         [("", manager.opus_load().busy)]),
        ("kept_conversations", "gauge", "suspended conversations on disk", [("", manager.store.count())]),
        ("sessions_opened_total", "counter", "sessions started or resumed", [("", m.opened)]),
        ("sessions_resumed_total", "counter", "sessions resumed from a token", [("", m.resumed)]),
        ("sessions_suspended_total", "counter", "conversations kept for later", [("", m.suspended)]),
        ("sessions_ended_total", "counter", "sessions ended or refused, by reason",
         [(f'{{reason="{k}"}}', v) for k, v in sorted(m.ended.items())]),
        ("discarded_messages_total", "counter", "messages of unknown kinds, discarded", [("", m.discarded)]),
        ("rss_bytes", "gauge", "resident memory of the server process", [("", rss_bytes())]),
    ]
    if torch.cuda.is_available():
        rows.append(("device_bytes", "gauge", "CUDA memory allocated", [("", torch.cuda.memory_allocated())]))
    lines = []
    for name, kind, help_, samples in rows:
        lines += [f"# HELP ttt_serve_{name} {help_}", f"# TYPE ttt_serve_{name} {kind}"]
        lines += [f"ttt_serve_{name}{labels} {_number(value)}" for labels, value in samples]
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text=render_metrics(request.app[MANAGER]), content_type="text/plain")
