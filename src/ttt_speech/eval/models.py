"""The models `eval-long` compares, each wrapped as a `Scorer` that streams it in its production form.

A scorer teacher-forces a held-out sequence through the model the way it runs when it serves:
- Moshi (vanilla or TTT hybrid): one frame per call through the temporal transformer in streaming
  mode, so the ring KV cache and the TTT states evolve exactly as under `LMGen`. moshi's
  `RingKVCache` is a correct sliding window only when fed one step per call (a longer call
  overwrites keys its own earlier queries still need), so frames are never batched in time. The
  depformer restarts every frame, so it runs in its (exact) training form on that frame. With
  `segment`, the same losses come from the training path instead (`moshi.segments`: windowed
  attention over segments, state carried), for the probes where speed matters more than the form.
- HF (vanilla or converted): chunks through `forward` with the model's cache (a `MemoryCache` with
  sliding-window KV layers for a converted model, a growing `DynamicCache` for a vanilla one);
  chunked feeding through these caches equals token-by-token decoding (tests/test_hf_generate.py).

Model specs on the command line: `tiny` (TTT hybrid built in code), `tiny-vanilla`, a Moshi hybrid
directory (config.json with a "memory" section), a vanilla Moshi directory (config.json +
model.safetensors), or a transformers directory; `NAME=SPEC` names a model in the report.
"""

from __future__ import annotations

import typing as tp
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttt_speech.names import memory_section

if tp.TYPE_CHECKING:
    from ttt_speech.moshi.files import MoshiDir

Tick = tp.Callable[[int], None]
BUILTINS = ("tiny", "tiny-vanilla")


class Scorer(ABC):
    """Per-position teacher-forced losses of one model, streamed as in production."""

    name: str
    kind: str  # "moshi" or "hf"
    streams: tuple[str, ...]  # scored streams; "text" first
    attention_window: int | None  # positions each attention layer sees; None: unbounded
    model: nn.Module

    @property
    def lookahead(self) -> int:
        """Positions past the last scored one that the stream must see to score it (Moshi's delays)."""
        return 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @abstractmethod
    def rows(self) -> int:
        """Rows of a shard this model reads (text + codebooks)."""

    @abstractmethod
    def pad_value(self) -> int:
        """Token that fills the tail of sequences shorter than their batch; never scored."""

    @abstractmethod
    def score(self, tokens: Tensor, out: Tensor, tick: Tick, reset_at: int | None = None) -> None:
        """Fill `out` [B, len(streams), T] (NaN-initialised) with the loss (nats) of each token of
        `tokens` [B, rows, T]; call `tick(steps_done)` as the stream advances. `reset_at`: restart the
        memory branches' states once that many positions have streamed in, attention keeping its window
        (the memory-reset control; Moshi only). May raise an out-of-memory error: what was written
        before it stays valid."""


def moshi_attention_window(lm: nn.Module) -> int | None:
    """The `context` of the temporal transformer's attention (0 when every layer is TTT-only)."""
    contexts = [layer.self_attn.context for layer in lm.transformer.layers if hasattr(layer, "self_attn")]
    if not contexts:
        return 0
    return None if any(c is None for c in contexts) else min(contexts)


def _cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Per-token loss in nats, NaN where the target is no token of the vocabulary (-1, initial tokens)."""
    valid = (target >= 0) & (target < logits.shape[-1])
    loss = F.cross_entropy(logits.float().flatten(0, -2), torch.where(valid, target, 0).flatten(), reduction="none")
    return torch.where(valid.flatten(), loss, torch.nan).view(target.shape)


class MoshiScorer(Scorer):
    """A moshi `LMModel` (or TTT hybrid): text + its own `dep_q` audio codebooks, frame by frame.

    `segment`: instead, `segment` frames per forward through `moshi.segments` (the training path, 20x
    faster on a CPU; the tests hold its losses equal to streaming's); it ticks once per segment.
    """

    kind = "moshi"

    def __init__(self, lm: nn.Module, name: str, segment: int | None = None) -> None:
        self.model = lm.eval()
        self.name = name
        self.segment = segment
        self.streams = ("text", *(f"audio{k}" for k in range(lm.dep_q)))
        self.attention_window = moshi_attention_window(lm)

    def rows(self) -> int:
        return self.model.num_codebooks

    @property
    def lookahead(self) -> int:
        return max(self.model.delays)

    def pad_value(self) -> int:
        return self.model.zero_token_id

    @torch.no_grad()
    def score(self, tokens: Tensor, out: Tensor, tick: Tick, reset_at: int | None = None) -> None:
        from moshi.utils.compile import CUDAGraphed

        from ttt_speech.moshi.layer import reset_memories
        from ttt_speech.moshi.segments import delayed_inputs

        lm = self.model
        B, _, T = tokens.shape
        S = len(self.streams)
        # the model's input at step j is column j; its targets are column j + 1 (as LMModel.forward)
        delayed = delayed_inputs(lm, tokens[:, :lm.num_codebooks].to(lm.device))
        delays = lm.delays[:S]
        if self.segment is not None:
            return self._score_segments(delayed, out, tick, reset_at)

        def frame(inputs: Tensor, targets: Tensor) -> Tensor:
            """[B, S] losses of one frame; only the temporal transformer streams, the depformer restarts anyway."""
            transformer_out, text_logits = lm.forward_text(inputs)
            losses = [_cross_entropy(text_logits[:, 0, 0], targets[:, 0, 0])[:, None]]
            if lm.dep_q:
                audio = lm.forward_depformer_training(targets, transformer_out)
                losses.append(_cross_entropy(audio[:, :, 0], targets[:, 1:S, 0]))
            return torch.cat(losses, dim=1)

        # one CUDA graph per frame, as moshi's LMGen steps: eager, a small model is launch-bound
        step = CUDAGraphed(frame, disable=lm.device.type != "cuda")
        with lm.transformer.streaming(B):
            for j in range(T):
                losses = step(delayed[:, :, j:j + 1], delayed[:, :, j + 1:j + 2]).cpu()
                for s, delay in enumerate(delays):
                    if j >= delay:  # before that, column j + 1 of a delayed codebook is padding
                        out[:, s, j - delay] = losses[:, s]
                if j + 1 == reset_at:
                    reset_memories(lm)
                tick(j + 1)

    def _score_segments(self, delayed: Tensor, out: Tensor, tick: Tick, reset_at: int | None) -> None:
        """`score` through `moshi.segments`: a segment ends at every multiple of `segment` and at `reset_at`."""
        from ttt_speech.moshi.segments import SegmentRunner, logits

        lm = self.model
        T = delayed.shape[-1] - 1
        S = len(self.streams)
        runner = SegmentRunner(lm, self.attention_window or T)  # None: unbounded attention; 0: no attention
        ends = sorted({*range(self.segment, T, self.segment), T} | ({reset_at} if reset_at and reset_at < T else set()))
        start = 0
        for end in ends:
            text, audio = logits(lm, delayed[:, :, start:end + 1], start, runner.layers_at(start))
            targets = delayed[:, :S, start + 1:end + 1]
            losses = torch.cat([_cross_entropy(text[:, 0], targets[:, 0])[:, None],
                                _cross_entropy(audio, targets[:, 1:S])], dim=1).cpu()  # [B, S, end - start]
            for s, delay in enumerate(lm.delays[:S]):  # step j scores position j - delay of stream s
                lo = max(start, delay)
                out[:, s, lo - delay:end - delay] = losses[:, s, lo - start:]
            if end == reset_at:
                runner.forget_memory()
            tick(end)
            start = end


class HFScorer(Scorer):
    """A transformers causal LM (converted or vanilla): row 0 of a shard, fed in chunks with its cache."""

    kind = "hf"
    streams = ("text",)

    def __init__(self, model: nn.Module, name: str, chunk: int = 256) -> None:
        from ttt_speech.hf.section import section_of

        self.model = model.eval()
        self.name = name
        self.chunk = chunk
        section = section_of(model.config)
        self.converted = section is not None
        if section is None:
            self.attention_window = getattr(model.config, "sliding_window", None)
        else:
            replaced = section.mode == "replace" and len(section.layers) == model.config.num_hidden_layers
            self.attention_window = 0 if replaced else section.attention_window

    def rows(self) -> int:
        return 1

    def pad_value(self) -> int:
        return -1

    def new_cache(self) -> tp.Any:
        from transformers import DynamicCache

        from ttt_speech.hf import MemoryCache

        return MemoryCache(self.model.config) if self.converted else DynamicCache(config=self.model.config)

    @torch.no_grad()
    def score(self, tokens: Tensor, out: Tensor, tick: Tick, reset_at: int | None = None) -> None:
        if reset_at is not None:
            raise ValueError(f"{self.name}: the memory-reset control needs a Moshi model (its streaming state)")
        ids = tokens[:, 0].to(self.device)
        T = ids.shape[-1]
        from ttt_speech.hf.compat import cache_kwargs

        carry = cache_kwargs(self.new_cache())
        for s in range(0, T, self.chunk):
            e = min(T, s + self.chunk)
            logits = self.model(ids[:, s:e].clamp(min=0), use_cache=True, **carry).logits
            # logits at position t predict token t + 1; token 0 has no prediction
            n = min(e + 1, T) - (s + 1)
            if n > 0:
                out[:, 0, s + 1:s + 1 + n] = _cross_entropy(logits[:, :n], ids[:, s + 1:s + 1 + n]).cpu()
            tick(e)


@dataclass
class Loaded:
    """A model ready to evaluate and what else its directory provides."""

    scorer: Scorer
    moshi_dir: MoshiDir | None = None  # a Moshi directory's: its Mimi and tokenizer decode and score the audio


def split_spec(spec: str) -> tuple[str, str]:
    """`NAME=SPEC` -> (NAME, SPEC); a bare SPEC is named after itself (its directory name)."""
    name, sep, rest = spec.partition("=")
    if sep and name and not Path(spec).exists():
        return name, rest
    return (Path(spec).name or spec), spec


@dataclass(frozen=True)
class Spec:
    """A command-line model spec, checked: its files are there and whole, its config.json is one we can build."""

    name: str
    path: str
    kind: str  # "builtin", "moshi" or "hf"
    config: dict[str, tp.Any]
    moshi_dir: MoshiDir | None = None  # kind "moshi": the directory as read

    def token_limits(self) -> tuple[int, int] | None:
        """(text vocabulary, audio codebook size) the model reads (HF: text only, audio 0); None: built in code."""
        if self.kind == "moshi":
            return int(self.config.get("text_card", 32000)), int(self.config.get("card", 1024))
        if self.kind == "hf":
            return int(self.config["vocab_size"]), 0
        return None


def check_spec(spec: str) -> Spec:
    """`spec` checked without building its model (a UsageError naming the directory or file otherwise)."""
    from ttt_speech.errors import UsageError, existing_dir, read_json_object

    name, path = split_spec(spec)
    if path in BUILTINS:
        return Spec(name, path, "builtin", {})
    root = existing_dir(path, f"--model directory (or one of {', '.join(BUILTINS)})")
    if not (root / "config.json").is_file():
        raise UsageError(f"--model {spec}: no config.json in {root}; give a model directory or one of "
                         f"{', '.join(BUILTINS)}")
    raw = read_json_object(root / "config.json", "config.json")
    if "dep_q" in raw and "n_q" in raw:
        from ttt_speech.moshi.files import MoshiDir

        found = MoshiDir.read(root, "--model")
        return Spec(name, path, "moshi", found.config, found)
    from ttt_speech.hf.checkpoint import check_llm_dir

    return Spec(name, path, "hf", check_llm_dir(root))


def load_model(spec: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               seed: int = 0, chunk: int = 256, segment: int | None = None) -> Loaded:
    """Build or load the model a command-line spec names (see the module docstring), after `check_spec`.
    `segment`: a Moshi model is scored through the training path in segments of that many frames."""
    checked = check_spec(spec)
    name, path = checked.name, checked.path
    if checked.kind == "builtin":
        from ttt_speech.moshi.tiny import build_tiny_hybrid, build_tiny_lm

        lm = build_tiny_hybrid(seed, device, dtype) if path == "tiny" else build_tiny_lm(seed, device=device, dtype=dtype)
        return Loaded(MoshiScorer(lm, name, segment))
    if checked.moshi_dir is not None:
        from ttt_speech.moshi import load_hybrid
        from ttt_speech.moshi.config import lm_kwargs

        found = checked.moshi_dir
        if found.hybrid:
            lm = load_hybrid(found.root, device=device, dtype=dtype)
        else:
            from moshi.models.loaders import get_moshi_lm

            lm = get_moshi_lm(str(found.weights), lm_kwargs=lm_kwargs(found.config), device=device, dtype=dtype)
        return Loaded(MoshiScorer(lm, name, segment), found)
    from ttt_speech.hf import convert, load_llm

    root = Path(path)
    converted = memory_section(checked.config) is not None
    model = convert.load(root, dtype=dtype) if converted else load_llm(root, dtype=dtype)[0]
    return Loaded(HFScorer(model.to(device), name, chunk))
