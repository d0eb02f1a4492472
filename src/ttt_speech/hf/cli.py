"""`ttt-speech convert-hf`: convert a local transformers checkpoint into a memory hybrid (in-place by default, or TTT).

Llama, Qwen2, Mixtral and Qwen2-Audio directories, and LLaMA-Omni's and VITA's (a Llama or Mixtral
with speech/vision modules beside it); `layouts.py` says where each keeps its decoder.

The output directory is a normal `save_pretrained` directory with a `ttt` section in config.json,
loadable with `convert.load(out)`. Tensors of the input the language model does not own (a
LLaMA-Omni speech encoder, projector, generator) are copied unchanged to `left_alone.safetensors`
so nothing is lost; other files (tokenizer, chat template, ...) are copied as they are.
"""

from __future__ import annotations

import argparse
import shutil
import typing as tp
from pathlib import Path

from ttt_speech.branches import DEFAULT_BRANCH, inplace_cost, wrong_branch
from ttt_speech.errors import UsageError, output_dir, positive_int, unit_interval

if tp.TYPE_CHECKING:
    from ttt_speech.config import InPlaceConfig, TTTConfig

LEFT_ALONE_FILE = "left_alone.safetensors"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json")
DTYPE_NAMES = ("auto", "bfloat16", "float16", "float32")


def parse_layers(spec: str) -> list[int]:
    """'24-31' -> [24, ..., 31]; '1,3,5-6' -> [1, 3, 5, 6]."""
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            out += range(int(lo), int(hi or lo) + 1)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad layer list {spec!r}; use e.g. 24-31 or 1,3,5-6") from None
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="local transformers directory (config.json + safetensors)")
    p.add_argument("--layers", required=True, type=parse_layers,
                   help="decoder layers to convert, e.g. 28-31 (in-place: 229 MiB of state per layer and session at "
                        "Llama-8B shape; at Moshi-7B all 32 layers cost 1.85x vanilla's step, 28-31 1.115x)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--mode", choices=["hybrid", "replace"], default="hybrid")
    p.add_argument("--attention-window", type=positive_int, default=4096,
                   help="sliding-window size of every attention layer")
    p.add_argument("--branch", choices=["ttt", "inplace"], default=None,
                   help="inplace (default): the layers' own MLPs become per-stream fast weights (docs/ttt.md; "
                        "--mode hybrid, gated MLPs, not Mixtral's MoE); ttt: a TTT branch beside attention")
    p.add_argument("--chunk", type=positive_int, default=None, help="in-place branch: tokens per fast-weight write "
                                                                    "(default 64)")
    p.add_argument("--decay", type=unit_interval, default=None,
                   help="in-place branch: the delta's initial per-chunk decay, learned per layer (default 1: none; "
                        "< 1 bounds the state for inputs of any length, e.g. 0.95)")
    p.add_argument("--mini-batch", type=positive_int, default=None, help="TTT mini-batch size (default 16)")
    p.add_argument("--inner", choices=["linear", "mlp"], default=None, help="TTT inner model (default linear)")
    p.add_argument("--variant", choices=["ttt-lm", "fla"], default=None, help="TTT update rule (default ttt-lm)")
    p.add_argument("--num-heads", type=positive_int, default=None,
                   help="TTT heads (default: the model's attention heads)")
    p.add_argument("--base-lr", type=float, default=None)
    p.add_argument("--gate-init", type=float, default=None,
                   help="TTT: initial gate alpha (output scaled by tanh(alpha); default 0)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="auto", help="dtype to load and save in")


def check_source(path: Path) -> dict[str, tp.Any]:
    """The config.json of the directory to convert, checked before anything is built (`check_llm_dir`), and
    not converted already."""
    from ttt_speech.hf.checkpoint import check_llm_dir

    cfg = check_llm_dir(path)
    from ttt_speech.hf.layouts import decoder_config_dict
    from ttt_speech.names import memory_section

    if memory_section(decoder_config_dict(cfg)) is not None:
        raise UsageError(f"--model {path}: already converted (its config.json has a memory section)")
    return cfg


TTT_ONLY = ("mini_batch", "inner", "variant", "num_heads", "gate_init")
INPLACE_ONLY = ("chunk", "decay")


def memory_config(args: argparse.Namespace, hidden_size: int, attention_heads: int,
               intermediate_size: int | None = None) -> TTTConfig | InPlaceConfig:
    """The branch config the options make for a decoder of this width (the MLP's, for --branch inplace)."""
    from ttt_speech.config import TTTConfig
    from ttt_speech.hf.conversion import default_inplace_config

    branch = args.branch or DEFAULT_BRANCH
    own = INPLACE_ONLY if branch == "inplace" else TTT_ONLY
    for key in (*INPLACE_ONLY, *TTT_ONLY):
        if getattr(args, key) is not None and key not in own:
            raise ValueError(wrong_branch("--" + key.replace("_", "-"), ["ttt" if branch == "inplace" else "inplace"],
                                          branch, "--branch", args.branch is not None))
    if branch == "inplace":
        if args.mode != "hybrid":
            raise ValueError(wrong_branch(f"--mode {args.mode}", ["ttt"], branch, "--branch", args.branch is not None)
                             + " (in-place keeps the attention and changes the MLPs)")
        extra = {k: getattr(args, k) for k in (*INPLACE_ONLY, "base_lr") if getattr(args, k) is not None}
        return default_inplace_config(hidden_size, intermediate_size or 0, **extra)
    return TTTConfig(dim=hidden_size, num_heads=args.num_heads or attention_heads, inner=args.inner or "linear",
                     mini_batch=args.mini_batch or 16, variant=args.variant or "ttt-lm", base_lr=args.base_lr,
                     gate_init=args.gate_init or 0.0)


def check_options(args: argparse.Namespace, cfg: dict[str, tp.Any]) -> None:
    """--layers, --mode and the TTT options against the decoder's part of config.json, where it states them."""
    from ttt_speech.hf.layouts import decoder_config_dict

    decoder = decoder_config_dict(cfg)
    n = decoder.get("num_hidden_layers")
    if isinstance(n, int) and not all(0 <= i < n for i in args.layers):
        raise UsageError(f"--layers {','.join(map(str, args.layers))}: the model has decoder layers 0-{n - 1}")
    if args.mode == "replace" and isinstance(n, int) and len(set(args.layers)) == n:
        raise UsageError("--mode replace needs at least one attention layer left (it keeps track of positions)")
    if (args.branch or DEFAULT_BRANCH) == "inplace" and decoder.get("num_local_experts"):
        raise UsageError(f"--model {args.model}: its MLPs are mixtures of experts, which have no one down_proj to make "
                         f"in-place fast weights of{'' if args.branch else ' (in-place is the default branch)'}: "
                         "use --branch ttt")
    width, heads = decoder.get("hidden_size"), decoder.get("num_attention_heads")
    if isinstance(width, int) and isinstance(heads, int):
        try:
            memory_config(args, width, heads, decoder.get("intermediate_size"))
        except ValueError as e:
            raise UsageError(f"convert-hf: {e} (see --branch, --num-heads, --inner, --variant, --mini-batch, "
                             "--chunk, --decay)") from None
    output_dir(args.out)


def run(args: argparse.Namespace) -> None:
    """Run `ttt-speech convert-hf` with the arguments `add_arguments` declared."""
    from safetensors.torch import save_file

    from ttt_speech.config import InPlaceConfig
    from ttt_speech.hf.checkpoint import load_llm, read_tensors
    from ttt_speech.hf.conversion import convert
    from ttt_speech.hf.layouts import decoder_of
    from ttt_speech.layers.inplace import InPlaceState

    cfg = check_source(args.model)
    check_options(args, cfg)
    model, report = load_llm(args.model, dtype=args.dtype)
    if report.missing_keys:
        raise UsageError(f"{args.model}: checkpoint lacks language-model parameters: {report.missing_keys}")
    config = decoder_of(model).config  # the language model's (Qwen2-Audio: its text_config)
    branch = memory_config(args, config.hidden_size, config.num_attention_heads, getattr(config, "intermediate_size", None))
    convert(model, layers=args.layers, mode=args.mode, memory=branch, attention_window=args.attention_window)

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    if report.left_alone_keys:
        save_file(read_tensors(args.model, set(report.left_alone_keys)), str(args.out / LEFT_ALONE_FILE))
    for f in sorted(args.model.iterdir()):
        keep = f.is_file() and f.name not in WEIGHT_FILES and f.suffix != ".safetensors"
        if keep and not (args.out / f.name).exists():
            shutil.copy2(f, args.out / f.name)

    print(report)
    if report.left_alone_keys:
        print(f"copied the {len(report.left_alone_keys)} left-alone tensors to {args.out / LEFT_ALONE_FILE}")
    print(f"converted layers {args.layers} ({args.mode}, {args.branch or DEFAULT_BRANCH} branch, attention window "
          f"{args.attention_window}) -> {args.out}")
    if isinstance(branch, InPlaceConfig):
        print(inplace_cost(len(set(args.layers)), InPlaceState.spec_nbytes(branch)))
