"""`ttt-speech serve`: load a model, a Mimi and a tokenizer, and serve Moshi's websocket protocol.

cli.py adds the subparser with `add_arguments(parser)` and calls `run(args)`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import signal
import socket
import sys
import tempfile
import typing as tp
from pathlib import Path

from ttt_speech.devices import DTYPE_NAMES, torch_device, torch_dtype
from ttt_speech.errors import (OFF, UsageError, check_safetensors, dbfs, nonnegative_float, nonnegative_int, output_dir,
                               port, positive_float, positive_float_or_off, positive_int, positive_int_or_off,
                               read_json_object, seconds_or_off)
from ttt_speech.moshi.commands import add_quantize_argument, check_quantize, quantize_or_exit
from ttt_speech.moshi.files import MIMI_CONFIG_NAME, MIMI_WEIGHTS_NAME, SHIPPED_DIR, TOKENIZER_NAME, MoshiDir
from ttt_speech.threads import add_threads_argument, use_cpu_threads

if tp.TYPE_CHECKING:
    import sentencepiece
    import torch
    from moshi.models.compression import MimiModel
    from moshi.models.lm import LMModel

    from ttt_speech.serve.sessions import SessionManager

log = logging.getLogger("ttt_speech.serve")
# the package's defaults, literal so that `--help` imports nothing heavy (tests/test_cli_errors.py holds them
# equal to serve/sessions.py, serve/sampling.py and serve/opus.py)
MAX_MESSAGE_BYTES, IDLE_TIMEOUT_S, MAX_LOAD = 1 << 16, 30.0, 1.0
TEMP, TEMP_TEXT, TOP_K, TOP_K_TEXT = 0.8, 0.7, 250, 25
AUTO, SESSIONS_PER_WORKER = "auto", 64


def opus_workers(text: str) -> int | None:
    """An integer >= 0, or "auto" (None: chosen from --max-sessions and the CPU count)."""
    if text == AUTO:
        return None
    try:
        return nonnegative_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 0 or '{AUTO}'") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="default: the small in-place memory hybrid + codec shipped in the package; "
                        "'tiny' (a tiny random TTT hybrid built in code), or a checkpoint directory: a hybrid "
                        "(convert-moshi / save_pretrained) or a vanilla Moshi config.json + weights")
    p.add_argument("--mimi", help="Mimi weights (.safetensors) or 'tiny' (default: the model directory's "
                                  f"mimi_name / {MIMI_WEIGHTS_NAME}; tiny with --model tiny)")
    p.add_argument("--mimi-config", help=f"Mimi config JSON (default: {MIMI_CONFIG_NAME} beside the weights, "
                                         "else the released Mimi's)")
    p.add_argument("--tokenizer", help=f"SentencePiece model (default: the model directory's tokenizer_name / "
                                       f"{TOKENIZER_NAME}; a tiny one with --model tiny)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port, default=8998, help="0 picks a free port (printed at start)")
    p.add_argument("--max-sessions", type=positive_int, default=4,
                   help="concurrent sessions = the batch of one LMGen step")
    p.add_argument("--state-dir", default="serve_states", help="directory of kept (suspended) conversations")
    p.add_argument("--max-kept", type=positive_int, default=100, help="most kept conversations on disk at once")
    p.add_argument("--keep-hours", type=positive_float, default=24.0,
                   help="a kept conversation not resumed by then is deleted")
    p.add_argument("--max-message-bytes", type=positive_int_or_off, default=MAX_MESSAGE_BYTES,
                   help=f"larger websocket messages end the session (1009); '{OFF}': no limit, unsafe on a network")
    p.add_argument("--idle-timeout", type=seconds_or_off, default=IDLE_TIMEOUT_S,
                   help=f"seconds without a message after which a session is closed; '{OFF}': never")
    p.add_argument("--max-load", type=positive_float_or_off, default=MAX_LOAD,
                   help="refuse new sessions (1013) while the batched step's p90 over the last 10 s is at or above "
                        "this fraction of the 80 ms frame, or the Opus coder a new session would join (the event "
                        "loop or a worker) would need this fraction of each frame with it: the server would not "
                        f"keep real time; '{OFF}': never")
    p.add_argument("--opus-workers", type=opus_workers, default=AUTO,
                   help="processes that Opus-code the sessions' audio (~0.8 ms CPU per session-frame: one process "
                        f"codes ~100 sessions in real time); 0: on the event loop; '{AUTO}' (default): 0 up to "
                        f"{SESSIONS_PER_WORKER} --max-sessions, else one per {SESSIONS_PER_WORKER} sessions, "
                        "at most the CPU count - 2")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is one)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="default: bfloat16 on CUDA, float32 on CPU")
    add_quantize_argument(p)
    add_threads_argument(p)
    p.add_argument("--seed", type=int, default=0, help="weights seed of --model tiny / --mimi tiny")
    p.add_argument("--temp", type=nonnegative_float, default=TEMP, help="audio sampling temperature")
    p.add_argument("--temp-text", type=nonnegative_float, default=TEMP_TEXT, help="text sampling temperature")
    p.add_argument("--top-k", type=nonnegative_int, default=TOP_K, help="audio tokens sampled from (0: all)")
    p.add_argument("--top-k-text", type=nonnegative_int, default=TOP_K_TEXT, help="text tokens sampled from (0: all)")
    p.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    p.add_argument("--listen-db", type=dbfs, metavar="DBFS",
                   help="an in-place memory writes only frames whose input is louder than DBFS (e.g. -50) and reads "
                        "without writing while the model talks alone, so it does not drift (docs/results.md section "
                        "18); default: it writes every frame, as trained")
    p.add_argument("--shutdown-after", type=seconds_or_off, default=None,
                   help=f"stop after this many seconds (default, '{OFF}': at SIGINT/SIGTERM)")


def model_dir(spec: str | None) -> MoshiDir | None:
    """--model read and checked (the shipped small in-place memory hybrid when not given); None for tiny."""
    return None if spec == "tiny" else MoshiDir.read(SHIPPED_DIR if spec is None else spec, "--model")


def load_model(spec: str | None, device: torch.device, dtype: torch.dtype,
               seed: int) -> tuple[LMModel, str, MoshiDir | None]:
    """(model, an identity string for state fingerprints, its directory or None for tiny)."""
    from moshi.models.loaders import get_moshi_lm

    from ttt_speech.moshi.checkpoint import load_hybrid
    from ttt_speech.moshi.config import lm_kwargs
    from ttt_speech.moshi.tiny import build_tiny_hybrid

    found = model_dir(spec)
    if found is None:
        return build_tiny_hybrid(seed, device, dtype), f"tiny-hybrid/seed={seed}", None
    text = found.config_path.read_text()
    model_id = f"{found.root.resolve().name}/{hashlib.sha256(text.encode()).hexdigest()[:16]}/{dtype}"
    if found.hybrid:
        return load_hybrid(found.root, device=device, dtype=dtype), model_id, found
    return get_moshi_lm(found.weights, lm_kwargs=lm_kwargs(found.config), device=device, dtype=dtype), model_id, found


def mimi_files(args: argparse.Namespace, found: MoshiDir | None) -> tuple[Path, Path | None] | None:
    """(weights, config or None) of the Mimi to load, checked; None for --mimi tiny."""
    spec = args.mimi or ("tiny" if found is None else None)
    if spec == "tiny":
        return None
    given = Path(args.mimi_config) if args.mimi_config else None
    if spec:
        path, config_path = Path(spec), given or Path(spec).parent / MIMI_CONFIG_NAME
    elif found is not None and found.mimi is not None:
        path, config_path = found.mimi, given or found.mimi_config
    else:
        raise UsageError("no Mimi found beside the model: give --mimi FILE (or --mimi tiny)")
    check_safetensors(path)
    if args.mimi_config or (config_path is not None and config_path.exists()):
        read_json_object(config_path, "Mimi config")
        return path, config_path
    return path, None


def load_mimi(args: argparse.Namespace, lm: LMModel, found: MoshiDir | None, device: torch.device) -> MimiModel:
    from moshi.models.loaders import get_mimi

    from ttt_speech.moshi.tiny import build_tiny_mimi, tiny_mimi_config

    n = max(lm.dep_q, lm.n_q - lm.dep_q)
    files = mimi_files(args, found)
    if files is None:
        return build_tiny_mimi(args.seed, tiny_mimi_config(n, lm.card), device=device, num_codebooks=n)
    path, config_path = files
    config = read_json_object(config_path, "Mimi config") if config_path else None
    return get_mimi(path, config, device=device, num_codebooks=n)


def tokenizer_file(args: argparse.Namespace, found: MoshiDir | None) -> Path | None:
    """The SentencePiece model to load, checked to exist; None for --model tiny (one is written)."""
    if args.tokenizer:
        return Path(args.tokenizer)
    if found is None:
        return None
    if found.tokenizer is None:
        raise UsageError("no tokenizer found beside the model: give --tokenizer FILE")
    return found.tokenizer


def load_tokenizer(args: argparse.Namespace, lm: LMModel, found: MoshiDir | None,
                   workdir: Path) -> sentencepiece.SentencePieceProcessor:
    from ttt_speech.moshi.checkpoint import load_text_tokenizer
    from ttt_speech.moshi.tiny import write_tiny_tokenizer

    path = tokenizer_file(args, found) or write_tiny_tokenizer(workdir / TOKENIZER_NAME, lm.text_card)
    return load_text_tokenizer(path, lm.text_card)


async def serve(manager: SessionManager, host: str, port: int, shutdown_after: float | None) -> None:
    """Serve until SIGINT/SIGTERM or `shutdown_after` seconds; sessions are closed with 1001."""
    from aiohttp import web

    from ttt_speech.serve.server import build_app

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
        await asyncio.wait_for(stop.wait(), timeout=shutdown_after)
    except asyncio.TimeoutError:
        pass
    finally:
        await runner.cleanup()


def check_serve(args: argparse.Namespace) -> MoshiDir | None:
    """Every file `run` will read, checked before anything is loaded; returns the model's directory (None: tiny)."""
    found = model_dir(args.model)
    if args.listen_db is not None and (found is None or (found.config.get("memory") or {}).get("branch") != "inplace"):
        raise UsageError(f"--listen-db {args.listen_db}: {found.root if found else 'the tiny model'} has no in-place "
                         "memory whose writes it could gate; drop --listen-db (or serve an in-place hybrid)")
    mimi_files(args, found)
    tokenizer = tokenizer_file(args, found)
    if tokenizer is not None:
        from ttt_speech.moshi.checkpoint import load_text_tokenizer

        load_text_tokenizer(tokenizer, found.config.get("text_card", 0) if found is not None else 0)
    output_dir(args.state_dir)
    check_address(args.host, args.port)
    return found


def check_address(host: str, port: int) -> None:
    """--host resolves and --port is free there: found now, not after the model has loaded."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: {e.strerror}; give an address of this machine, e.g. 127.0.0.1") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise UsageError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); "
                             "give a free port (0 picks one)") from None


def run(args: argparse.Namespace) -> None:
    from ttt_speech.serve.sampling import SamplingConfig
    import torch

    import os

    from ttt_speech.serve.capacity import check_fits, session_bytes
    from ttt_speech.serve.opus import auto_workers
    from ttt_speech.serve.sessions import Admission, Limits, SessionManager
    from ttt_speech.serve.store import StateStore, fingerprint, legacy_fingerprint
    from ttt_speech.serve.streams import BatchedStreams

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch_device(args.device)
    dtype = torch_dtype(args.dtype, device)
    check_quantize(args.quantize, device, dtype, args.quantize_compile)
    check_serve(args)
    use_cpu_threads(args.threads)
    workers = auto_workers(args.max_sessions, os.cpu_count()) if args.opus_workers is None else args.opus_workers
    lm, model_id, found = load_model(args.model, device, dtype, args.seed)
    if args.quantize:
        log.info("%s", quantize_or_exit(lm, args.quantize, args.quantize_compile))
        model_id += f"/{args.quantize}"  # kept conversations resume only on the weights that made them
    mimi = load_mimi(args, lm, found, device)
    sampling = SamplingConfig(args.temp, args.temp_text, args.top_k, args.top_k_text, args.greedy)
    with tempfile.TemporaryDirectory(prefix="ttt-serve-") as work:
        tokenizer = load_tokenizer(args, lm, found, Path(work))
        if device.type == "cuda":  # a clear refusal instead of an out-of-memory error halfway through allocating
            check_fits(args.max_sessions, session_bytes(lm.eval(), mimi.eval())[0], torch.cuda.mem_get_info(device)[0])
        streams = BatchedStreams(lm.eval(), mimi.eval(), args.max_sessions, sampling, args.listen_db)
        streams.warmup()
        store = StateStore(args.state_dir, fingerprint(model_id, streams.layout), args.max_kept,
                           args.keep_hours * 3600, legacy_fingerprint(model_id, streams.layout))
        manager = SessionManager(streams, store, tokenizer, Limits(max_message_bytes=args.max_message_bytes,
                                                                     idle_timeout_s=args.idle_timeout),
                                 Admission(max_load=args.max_load), workers)
        log.info("%s on %s: %d sessions, %.1f KiB of streaming state each, Opus on %s", model_id, device,
                 args.max_sessions, streams.slot_bytes / 1024,
                 f"{workers} worker processes" if workers else "the event loop")
        if args.listen_db is not None:
            log.info("in-place memory writes only frames louder than %.1f dBFS (the user heard)", args.listen_db)
        asyncio.run(serve(manager, args.host, args.port, args.shutdown_after))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ttt_speech.serve.commands", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
