"""`BatchedStreams`: the fixed batch of streams that one Mimi encode, one LMGen step and one Mimi
decode advance together, and the per-stream slices of its state that a suspend saves.

Every session owns one row ("slot") of the batch. Rows are started with `reset_streaming(mask)` and
skipped with exec masks, so a session's computation does not depend on the other rows. A slot's
state is every per-stream tensor of the streaming states of the LMGen, its LM (attention ring KV
caches, TTT states, offsets) and Mimi (conv buffers, its transformer's KV cache): a fixed size that
does not grow with the conversation's length.
"""

from __future__ import annotations

import typing as tp
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch
from moshi.models.compression import MimiModel
from moshi.models.lm import LMModel
from moshi.modules.streaming import StreamingModule
from moshi.modules.transformer import RingKVCache
from torch import Tensor

from ttt_speech.layers.state import LayerState
from ttt_speech.moshi.compat import streaming_state
from ttt_speech.moshi.layer import write_mutes
from ttt_speech.serve.sampling import SamplingConfig, SeededLMGen

# Streaming-state fields shared by all rows or driven by the server, never saved per stream.
_SHARED_FIELDS = frozenset({"exec_mask", "initial", "condition_sum", "condition_cross", "cfg_is_masked_until"})

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass
class StepResult:
    """One batched step, on the CPU. Rows that are idle or still inside the acoustic delay have
    generated=False (their tokens and pcm are meaningless)."""

    tokens: np.ndarray  # [B, 1 + dep_q] int64: text token, then the audio codebooks
    generated: np.ndarray  # [B] bool
    pcm: np.ndarray  # [B, frame_size] float32 at mimi.sample_rate


class BatchedStreams:
    """`batch_size` independent conversations stepped together; see the module docstring."""

    def __init__(self, lm: LMModel, mimi: MimiModel, batch_size: int,
                 sampling: SamplingConfig = SamplingConfig(), listen_db: float | None = None) -> None:
        """`listen_db`: an in-place memory writes only the frames whose input (the user's voice) is louder than
        this many dBFS and reads without writing the others, where the model talks alone (`quiet_frames`)."""
        if lm.fuser is not None or lm.condition_provider is not None:
            raise ValueError("conditioned Moshi models (fuser / condition provider) are not supported by the server")
        if mimi.cardinality != lm.card:
            raise ValueError(f"Mimi has {mimi.cardinality} bins per codebook, the LM {lm.card}")
        self.lm, self.mimi, self.batch_size = lm, mimi, batch_size
        self.n_user = lm.n_q - lm.dep_q
        mimi.set_num_codebooks(max(lm.dep_q, self.n_user))
        self.device = lm.device
        self.gen = SeededLMGen(lm, sampling)
        self._exit = ExitStack()
        try:  # a batch that does not fit (CUDA out of memory) leaves the models as they were
            self._exit.enter_context(self.gen.streaming(batch_size))
            self._exit.enter_context(mimi.streaming(batch_size))
        except BaseException:
            self._exit.close()
            raise
        self.listen_db = listen_db
        self._mutes = [] if listen_db is None else write_mutes(self.gen.lm_model)
        if listen_db is not None and not self._mutes:
            self._exit.close()
            raise ValueError(f"listen_db={listen_db}: writing only while the user speaks needs an in-place memory, "
                             "and this model has none")
        self.layout: Layout = {k: (tuple(t.select(d, 0).shape), t.dtype) for k, (t, d) in self._tensors().items()}
        self.slot_bytes = sum(int(np.prod(s)) * dt.itemsize for s, dt in self.layout.values())

    def close(self) -> None:
        """Leave streaming mode (frees the batch's state)."""
        self._exit.close()

    def _streaming_modules(self) -> tp.Iterator[tuple[str, StreamingModule]]:
        # LMGen detaches its LM from its own streaming tree, so the LM is walked separately.
        yield from (("gen", self.gen), ("lm", self.gen.lm_model), ("mimi", self.mimi))

    def _tensors(self) -> dict[str, tuple[Tensor, int]]:
        """Every per-stream tensor of the streaming states: name -> (tensor, its batch dimension).

        Walked afresh each time: some moshi states rebind their tensors at each step.
        """
        out: dict[str, tuple[Tensor, int]] = {}

        def add(name: str, t: Tensor, dim: int) -> None:
            if t.dim() <= dim or t.shape[dim] != self.batch_size:
                raise RuntimeError(f"streaming state {name} has shape {tuple(t.shape)}: cannot tell which part "
                                   f"belongs to which of the {self.batch_size} streams")
            out[name] = (t, dim)

        for owner, module in self._streaming_modules():
            for path, state in module.get_streaming_state().items():
                for field, value in vars(state).items():
                    name = ".".join(p for p in (owner, path, field) if p)
                    if field in _SHARED_FIELDS:
                        continue
                    if isinstance(value, Tensor):
                        add(name, value, 0)
                    elif isinstance(value, RingKVCache):  # cache is [2, B, heads, capacity, head_dim]
                        add(name + ".cache", value.cache, 1)
                        add(name + ".end_offset", value.end_offset, 0)
                    elif isinstance(value, LayerState):  # TTT or Gated DeltaNet branch
                        for key, t in value.tensors.items():
                            add(f"{name}.{key}", t, 0)
        return out

    def _mask(self, slots: tp.Iterable[int]) -> Tensor:
        mask = torch.zeros(self.batch_size, dtype=torch.bool)
        mask[list(slots)] = True
        return mask.to(self.device)

    def start(self, slot: int, seed: int) -> None:
        """A fresh conversation in `slot`, sampling from `seed`; the other rows are untouched."""
        self.start_many({slot: seed})

    @torch.no_grad()
    def start_many(self, seeds: tp.Mapping[int, int]) -> None:
        """Fresh conversations in the slots of `seeds` (slot -> seed) with one masked reset: a reset rewrites
        every row's state, so at 7B shape starting 200 slots one by one moves ~200x the state."""
        slots = list(seeds)
        mask = self._mask(slots)
        self.gen.reset_streaming(mask)
        self.mimi.reset_streaming(mask)
        state = streaming_state(self.gen)
        state.seeds[slots] = torch.tensor(list(seeds.values()), device=self.device)  # type: ignore[union-attr]

    @torch.no_grad()
    def step(self, pcm: np.ndarray, active: np.ndarray, first: np.ndarray) -> StepResult:
        """Advance the rows in `active` by one frame of input pcm [B, frame_size].

        `first` marks rows on their session's first frame: as moshi's server does, Mimi's state of
        those rows is reset after encoding it, so the encoder applies its left padding again.
        """
        B = self.batch_size
        active_t = torch.from_numpy(active).to(self.device)
        x = torch.from_numpy(pcm).to(self.device, torch.float32)[:, None]
        self.mimi.set_exec_mask(active_t)
        codes = self.mimi.encode(x)[:, :self.n_user]
        if first.any():
            self.mimi.reset_streaming(torch.from_numpy(first).to(self.device))
        if self._mutes:
            mute = torch.from_numpy(quiet_frames(pcm, tp.cast(float, self.listen_db))).to(self.device, torch.float32)
            for t in self._mutes:
                t.copy_(mute)
        self.gen.set_exec_mask(active_t)
        tokens = self.gen.step(codes)
        assert tokens is not None  # support_out_of_sync: never None
        tokens = tokens[:, :, 0]
        generated = active_t & (tokens != self.lm.ungenerated_token_id).all(dim=1)
        self.mimi.set_exec_mask(generated)
        audio = torch.where(generated[:, None], tokens[:, 1:], torch.zeros_like(tokens[:, 1:]))
        out = self.mimi.decode(audio[:, :, None])[:, 0]
        return StepResult(tokens.cpu().numpy(), generated.cpu().numpy(),
                          out.float().cpu().numpy().reshape(B, -1))

    def warmup(self, steps: int = 2) -> None:
        """Steps with every row idle: the first step of a process pays one-time initialisation (seconds
        on a CPU) and CUDA graphs are captured on the second; better before the first client than during."""
        B, F = self.batch_size, self.mimi.frame_size
        idle = np.zeros(B, bool)
        for _ in range(steps):
            self.step(np.zeros((B, F), np.float32), idle, idle)

    @torch.no_grad()
    def snapshot(self, slot: int) -> dict[str, Tensor]:
        """Copies (CPU) of every per-stream tensor of `slot`."""
        return {name: t.select(dim, slot).to("cpu", copy=True).contiguous()
                for name, (t, dim) in self._tensors().items()}

    @torch.no_grad()
    def restore(self, slot: int, tensors: dict[str, Tensor]) -> None:
        """Write a `snapshot` into `slot` in place (CUDA graphs captured on the state stay valid)."""
        check_layout(tensors, self.layout)
        for name, (t, dim) in self._tensors().items():
            t.select(dim, slot).copy_(tensors[name])


def quiet_frames(pcm: np.ndarray, db: float) -> np.ndarray:
    """[B] 1.0 where a frame of pcm [B, samples] (full scale 1.0) has an RMS level below `db` dBFS, else 0.0.
    Moshi reads the user's codebook 0 of a frame in the step that receives it, so the mute applies at once."""
    power = np.mean(np.square(pcm, dtype=np.float64), axis=1)
    return (10.0 * np.log10(power + 1e-20) < db).astype(np.float32)


def check_layout(tensors: dict[str, Tensor], layout: Layout) -> None:
    """Raise ValueError unless `tensors` has exactly the names, shapes and dtypes of `layout`."""
    if set(tensors) != set(layout):
        missing, extra = sorted(set(layout) - set(tensors)), sorted(set(tensors) - set(layout))
        raise ValueError(f"state does not match this model: missing {missing[:4]}, unexpected {extra[:4]}")
    for name, (shape, dtype) in layout.items():
        t = tensors[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"state tensor {name}: expected {shape} {dtype}, got {tuple(t.shape)} {t.dtype}")
