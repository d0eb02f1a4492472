"""`ttt-speech serve`: load a model, a Mimi and a tokenizer, and serve Moshi's websocket protocol.

cli.py adds the subparser with `add_arguments(parser)` and calls `run(args)`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import signal
import sys
import tempfile
from pathlib import Path

import sentencepiece
import torch
from aiohttp import web
from moshi.models.compression import MimiModel
from moshi.models.lm import LMModel
from moshi.models.loaders import get_mimi, get_moshi_lm

from ttt_speech.moshi.checkpoint import CONFIG_NAME, TTT_SECTION, WEIGHTS_NAME, load_hybrid
from ttt_speech.moshi.commands import add_quantize_argument, quantize_or_exit
from ttt_speech.moshi.config import lm_kwargs
from ttt_speech.moshi.scratch import SHIPPED_DIR
from ttt_speech.moshi.tiny import (
    MIMI_CONFIG_NAME,
    MIMI_WEIGHTS_NAME,
    TOKENIZER_NAME,
    build_tiny_hybrid,
    build_tiny_mimi,
    tiny_mimi_config,
    write_tiny_tokenizer,
)
from ttt_speech.serve.sampling import SamplingConfig
from ttt_speech.serve.server import build_app
from ttt_speech.serve.sessions import Limits, SessionManager
from ttt_speech.serve.store import StateStore, fingerprint
from ttt_speech.serve.streams import BatchedStreams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
log = logging.getLogger("ttt_speech.serve")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(SHIPPED_DIR),
                   help="default: the small TTT hybrid + codec shipped in the package; "
                        "'tiny' (a tiny random TTT hybrid built in code), or a checkpoint directory: a hybrid "
                        "(convert-moshi / save_pretrained) or a vanilla Moshi config.json + weights")
    p.add_argument("--mimi", help="Mimi weights (.safetensors) or 'tiny' (default: the model directory's "
                                  f"mimi_name / {MIMI_WEIGHTS_NAME}; tiny with --model tiny)")
    p.add_argument("--mimi-config", help=f"Mimi config JSON (default: {MIMI_CONFIG_NAME} beside the weights, "
                                         "else the released Mimi's)")
    p.add_argument("--tokenizer", help=f"SentencePiece model (default: the model directory's tokenizer_name / "
                                       f"{TOKENIZER_NAME}; a tiny one with --model tiny)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8998, help="0 picks a free port (printed at start)")
    p.add_argument("--max-sessions", type=int, default=4, help="concurrent sessions = the batch of one LMGen step")
    p.add_argument("--state-dir", default="serve_states", help="directory of kept (suspended) conversations")
    p.add_argument("--max-kept", type=int, default=100, help="most kept conversations on disk at once")
    p.add_argument("--keep-hours", type=float, default=24.0, help="a kept conversation not resumed by then is deleted")
    p.add_argument("--max-message-bytes", type=int, default=Limits.max_message_bytes,
                   help="larger websocket messages end the session (1009)")
    p.add_argument("--idle-timeout", type=float, default=Limits.idle_timeout_s,
                   help="seconds without a message after which a session is closed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    add_quantize_argument(p)
    p.add_argument("--seed", type=int, default=0, help="weights seed of --model tiny / --mimi tiny")
    p.add_argument("--temp", type=float, default=SamplingConfig.temp)
    p.add_argument("--temp-text", type=float, default=SamplingConfig.temp_text)
    p.add_argument("--top-k", type=int, default=SamplingConfig.top_k)
    p.add_argument("--top-k-text", type=int, default=SamplingConfig.top_k_text)
    p.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    p.add_argument("--shutdown-after", type=float, default=0.0,
                   help="stop after this many seconds (0: until SIGINT/SIGTERM)")


def _first_existing(root: Path, names: list[str | None]) -> Path | None:
    return next((root / n for n in names if n and (root / n).exists()), None)


def load_model(spec: str, device: torch.device, dtype: torch.dtype, seed: int) -> tuple[LMModel, str, dict]:
    """(model, an identity string for state fingerprints, the directory's config.json or {})."""
    if spec == "tiny":
        return build_tiny_hybrid(seed, device, dtype), f"tiny-hybrid/seed={seed}", {}
    root = Path(spec)
    text = (root / CONFIG_NAME).read_text()
    raw = json.loads(text)
    model_id = f"{root.resolve().name}/{hashlib.sha256(text.encode()).hexdigest()[:16]}/{dtype}"
    if TTT_SECTION in raw:
        return load_hybrid(root, device=device, dtype=dtype), model_id, raw
    weights = _first_existing(root, [raw.get("moshi_name"), WEIGHTS_NAME])
    if weights is None:
        raise SystemExit(f"{root}: no Moshi weights ({raw.get('moshi_name') or WEIGHTS_NAME})")
    return get_moshi_lm(weights, lm_kwargs=lm_kwargs(raw), device=device, dtype=dtype), model_id, raw


def load_mimi(args: argparse.Namespace, lm: LMModel, raw: dict, device: torch.device) -> MimiModel:
    n = max(lm.dep_q, lm.n_q - lm.dep_q)
    spec = args.mimi or ("tiny" if args.model == "tiny" else None)
    if spec == "tiny":
        return build_tiny_mimi(args.seed, tiny_mimi_config(n, lm.card), device=device, num_codebooks=n)
    path = Path(spec) if spec else _first_existing(Path(args.model), [raw.get("mimi_name"), MIMI_WEIGHTS_NAME])
    if path is None:
        raise SystemExit("no Mimi found beside the model: give --mimi FILE")
    config_path = Path(args.mimi_config) if args.mimi_config else path.parent / MIMI_CONFIG_NAME
    config = json.loads(config_path.read_text()) if config_path.exists() else None
    return get_mimi(path, config, device=device, num_codebooks=n)


def load_tokenizer(args: argparse.Namespace, lm: LMModel, raw: dict,
                   workdir: Path) -> sentencepiece.SentencePieceProcessor:
    if args.tokenizer:
        path: Path | None = Path(args.tokenizer)
    elif args.model == "tiny":
        path = write_tiny_tokenizer(workdir / TOKENIZER_NAME, lm.text_card)
    else:
        path = _first_existing(Path(args.model), [raw.get("tokenizer_name"), TOKENIZER_NAME])
    if path is None:
        raise SystemExit("no tokenizer found beside the model: give --tokenizer FILE")
    return sentencepiece.SentencePieceProcessor(model_file=str(path))


async def serve(manager: SessionManager, host: str, port: int, shutdown_after: float) -> None:
    """Serve until SIGINT/SIGTERM or `shutdown_after` seconds; sessions are closed with 1001."""
    runner = web.AppRunner(build_app(manager), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound = runner.addresses[0]
    print(f"ttt-speech serve: listening on http://{bound[0]}:{bound[1]} (websocket /api/chat)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), timeout=shutdown_after or None)
    except asyncio.TimeoutError:
        pass
    finally:
        await runner.cleanup()


def run(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    lm, model_id, raw = load_model(args.model, device, dtype, args.seed)
    if args.quantize:
        log.info("%s", quantize_or_exit(lm, args.quantize))
        model_id += f"/{args.quantize}"  # kept conversations resume only on the weights that made them
    mimi = load_mimi(args, lm, raw, device)
    sampling = SamplingConfig(args.temp, args.temp_text, args.top_k, args.top_k_text, args.greedy)
    with tempfile.TemporaryDirectory(prefix="ttt-serve-") as work:
        tokenizer = load_tokenizer(args, lm, raw, Path(work))
        streams = BatchedStreams(lm.eval(), mimi.eval(), args.max_sessions, sampling)
        streams.warmup()
        store = StateStore(args.state_dir, fingerprint(model_id, streams.layout), args.max_kept,
                           args.keep_hours * 3600)
        manager = SessionManager(streams, store, tokenizer, Limits(max_message_bytes=args.max_message_bytes,
                                                                     idle_timeout_s=args.idle_timeout))
        log.info("%s on %s: %d sessions, %.1f KiB of streaming state each", model_id, device,
                 args.max_sessions, streams.slot_bytes / 1024)
        asyncio.run(serve(manager, args.host, args.port, args.shutdown_after))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ttt_speech.serve.commands", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
