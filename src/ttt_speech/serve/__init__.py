"""A real-time full-duplex server for Moshi-style models that speaks Moshi's websocket protocol.

    ttt-speech serve --model DIR|tiny [--mimi FILE] --host 127.0.0.1 --port 8998

protocol.py  the messages (Moshi's, plus a SUSPEND control and ?resume= / ?seed= query parameters)
sampling.py  per-session seeded sampling inside moshi's LMGen
streams.py   the batch of sessions one Mimi + LMGen step advances; per-session state snapshots
store.py     kept conversations: safetensors files named by unguessable tokens
sessions.py  sessions, limits, metrics and the engine task that batches them
opus.py      Opus coding of every session's audio, on the event loop or in worker processes (--opus-workers)
server.py    the aiohttp app: /api/chat, /health, /metrics
commands.py  the command line (add_arguments / run)
capacity.py  how many sessions keep real time: a ramp through the batched step (benchmarks/serve_capacity.py)
client.py    `ttt-speech talk`: a headless client (send a wav, record the reply); aiohttp + sphn, no torch

protocol.py and client.py import neither torch nor moshi; the model modules do.
"""
