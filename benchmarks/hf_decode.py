"""Long-context decoding of a Llama-3.1-8B-shaped model: original (full KV cache) vs TTT hybrid (window + TTT).

    python benchmarks/hf_decode.py                      # 8B shape, random bf16 weights, CUDA, contexts 4k/32k/128k
    python benchmarks/hf_decode.py --variant fla        # TTT layers through flash-linear-attention's kernel
    python benchmarks/hf_decode.py --tiny               # a tiny model on CPU: checks the script end to end

Weights are random (built on the meta device, then `to_empty` on the device), so only speed and
memory mean anything. For each context the model is prefilled (the original in one forward, the
hybrid in window-sized chunks through its MemoryCache), then decodes `--steps` tokens one at a time.
Prints markdown table rows: decode ms/token, peak allocated memory, cache (+ TTT state) size, and
prefill tokens/s at the `--prefill-context`.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from ttt_speech import TTTConfig
from ttt_speech.hf import MemoryCache, convert
from ttt_speech.hf.cli import parse_layers
from ttt_speech.hf.compat import cache_kwargs

LLAMA_31_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
    rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                         high_freq_factor=4.0, original_max_position_embeddings=8192),
)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096)


def build(shape: dict, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """Random-weight model: meta init (no host memory), `to_empty` on the device, then N(0, 0.02) / ones."""
    config = LlamaConfig(**shape, attn_implementation="sdpa", dtype=dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).to_empty(device=device).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
        with torch.device(device):  # its inv_freq buffer is not a parameter: to_empty left it garbage
            model.model.rotary_emb = type(model.model.rotary_emb)(config)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cache_bytes(cache) -> int:
    if isinstance(cache, MemoryCache):
        return cache.nbytes
    return sum(layer.keys.untyped_storage().nbytes() * 2 for layer in cache.layers if layer.is_initialized)


@torch.no_grad()
def run(model, cache, context: int, chunk: int, steps: int, device: torch.device) -> dict[str, float]:
    """Prefill `context` random tokens in chunks of `chunk`, then time `steps` single-token decode steps."""
    vocab = model.config.vocab_size
    ids = torch.randint(vocab, (1, context), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    for s in range(0, context, chunk):
        model(ids[:, s : s + chunk], use_cache=True, **cache_kwargs(cache), logits_to_keep=1)
    sync(device)
    prefill_s = time.perf_counter() - t0
    tok = torch.randint(vocab, (1, 1), device=device)
    for _ in range(2):  # warm-up
        model(tok, use_cache=True, **cache_kwargs(cache))
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        model(tok, use_cache=True, **cache_kwargs(cache))
    sync(device)
    decode_ms = (time.perf_counter() - t0) / steps * 1e3
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else float("nan")
    return dict(prefill_tok_s=context / prefill_s, decode_ms=decode_ms, peak_gib=peak / 2**30,
                cache_mib=cache_bytes(cache) / 2**20)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU (end-to-end check, not a benchmark)")
    p.add_argument("--contexts", default=None, help="comma-separated (default 4096,32768,131072; tiny: 64,256,512)")
    p.add_argument("--prefill-context", type=int, default=None, help="context whose prefill tok/s is reported")
    p.add_argument("--window", type=int, default=None, help="attention window of the hybrid (default 4096)")
    p.add_argument("--layers", default="24-31", help="layers that get TTT")
    p.add_argument("--mini-batch", type=int, default=16)
    p.add_argument("--variant", choices=["ttt-lm", "fla"], default="ttt-lm")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per context")
    args = p.parse_args(argv)

    if args.tiny:
        device, dtype, shape = torch.device("cpu"), torch.float32, TINY
        contexts = [int(c) for c in (args.contexts or "64,256,512").split(",")]
        window, layers, prefill_ctx = args.window or 32, [2, 3], args.prefill_context or 256
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs CUDA (or pass --tiny)")
        device, dtype, shape = torch.device("cuda"), torch.bfloat16, LLAMA_31_8B
        contexts = [int(c) for c in (args.contexts or "4096,32768,131072").split(",")]
        window, layers, prefill_ctx = args.window or 4096, parse_layers(args.layers), args.prefill_context or 32768
    torch.manual_seed(0)
    model = build(shape, device, dtype)
    name = "tiny" if args.tiny else "Llama-3.1-8B shape"
    print(f"# {name}, {dtype}, {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}; "
          f"hybrid: window {window}, TTT layers {layers}, mini-batch {args.mini_batch}, {args.variant}")
    print("| model | context | decode ms/token | peak GiB | cache MiB | prefill tok/s |")
    print("|---|---|---|---|---|---|")
    for label in ("original (full KV)", f"hybrid (window {window} + TTT)"):
        if label.startswith("hybrid"):
            ttt = TTTConfig(dim=shape["hidden_size"], num_heads=shape["num_attention_heads"],
                            mini_batch=args.mini_batch, variant=args.variant)
            convert(model, layers=layers, ttt=ttt, attention_window=window)
        for ctx in contexts:
            cache = MemoryCache(model.config) if label.startswith("hybrid") else DynamicCache(config=model.config)
            chunk = window if label.startswith("hybrid") else ctx
            r = run(model, cache, ctx, chunk, args.steps, device)
            del cache
            prefill = f"{r['prefill_tok_s']:.0f}" if ctx == prefill_ctx else ""
            print(f"| {label} | {ctx} | {r['decode_ms']:.2f} | {r['peak_gib']:.2f} | {r['cache_mib']:.3f} "
                  f"| {prefill} |", flush=True)


if __name__ == "__main__":
    main()
