"""A synthetic stream with a known answer: key -> value pairs shown once, asked for far later.

Does a memory branch *store*? Each sequence shows P random pairs ``k_1 v_1 ... k_P v_P``, then G
filler frames, then asks every key again in a new order (``k_i`` followed by ``v_i``). At the first
showing the value cannot be predicted (chance: 1 / n_values); at the query it can, but only from
what the model still reaches: the current frame and the one before it, plus (with `window` W > 0)
one attention head over the last W frames, the stand-in for a speech LM's attention window. The
query block starts 2P + G frames after the shown block (every pair's mean distance), so with a
window, gaps below about W are recalled by attention and gaps far beyond it by the memory only.

The models are one residual block: ``x_t = E[tok_t] + E'[tok_{t-1}]``,
``h = x + attention_W(n) + MLP(n) + memory(n)`` with ``n = RMSNorm(x)``, logits ``= head(RMSNorm(h))``.
For the in-place design the memory *is* the MLP (`InPlaceLayer` around the same gated MLP).
Everything is trained from scratch by the outer loss (cross-entropy of the values), with new pairs
in every sequence, so nothing can be memorised in the slow weights.

`compare` trains each design and reports, per gap, the query loss against the first-showing loss
(the "copy vs never seen" change of `probe-memory`, with a bootstrap 95 % interval over sequences),
the query accuracy, and optionally the change at one gap every few steps (is it still improving?).
"""

from __future__ import annotations

import time
import typing as tp
from dataclasses import dataclass

import numpy as np

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttt_speech.config import GatedDeltaNetConfig, InPlaceConfig, TTTConfig
from ttt_speech.eval.copies import ratio_interval
from ttt_speech.layers.inplace import fresh_mlp

DESIGNS = ("none", "ttt", "ttt-next", "gdn", "inplace")


@dataclass
class RecallTask:
    """Vocabulary: keys [0, n_keys), values [n_keys, n_keys + n_values), then filler tokens."""

    n_keys: int = 32
    n_values: int = 32
    n_filler: int = 16
    pairs: int = 8

    @property
    def vocab(self) -> int:
        return self.n_keys + self.n_values + self.n_filler

    def sample(self, batch: int, gap: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """tokens [B, 2P + gap + 2P]; the frames whose *next* token is a value: at first showing and at the query."""
        P = self.pairs
        keys = torch.stack([torch.randperm(self.n_keys, generator=g)[:P] for _ in range(batch)])
        values = self.n_keys + torch.randint(self.n_values, (batch, P), generator=g)
        filler = self.n_keys + self.n_values + torch.randint(self.n_filler, (batch, gap), generator=g)
        order = torch.stack([torch.randperm(P, generator=g) for _ in range(batch)])
        shown = torch.stack([keys, values], -1).flatten(1)
        asked = torch.stack([keys.gather(1, order), values.gather(1, order)], -1).flatten(1)
        first = torch.arange(0, 2 * P, 2)
        query = 2 * P + gap + first
        return torch.cat([shown, filler, asked], 1), first, query


class WindowAttention(nn.Module):
    """One causal attention head over the last `window` frames (the frame itself included), no positions: the
    current frame's key finds the frame whose previous token it is and reads that frame's value."""

    def __init__(self, dim: int, window: int) -> None:
        super().__init__()
        self.window = window
        self.qkv, self.out = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        i = torch.arange(x.shape[1], device=x.device)
        seen = (i[None] <= i[:, None]) & (i[None] > i[:, None] - self.window)
        return self.out(F.scaled_dot_product_attention(*self.qkv(x).chunk(3, -1), attn_mask=seen))


class RecallModel(nn.Module):
    """One residual block over the current and previous frame (and, with `window` > 0, an attention head over the
    last `window` frames), with one memory design beside (or in) its MLP."""

    def __init__(self, design: str, vocab: int, dim: int = 64, hidden: int = 128, chunk: int = 8,
                 window: int = 0) -> None:
        super().__init__()
        if design not in DESIGNS:
            raise ValueError(f"design must be one of {DESIGNS}, got {design!r}")
        self.design = design
        self.attn = WindowAttention(dim, window) if window else None
        self.emb, self.emb_prev = nn.Embedding(vocab, dim), nn.Embedding(vocab, dim)
        self.norm, self.head_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)
        mlp = fresh_mlp(dim, hidden, dim**-0.5)
        self.memory: nn.Module | None = None
        if design == "inplace":
            self.mlp = InPlaceConfig(dim, hidden, chunk=chunk, target_init_std=dim**-0.5).build(mlp)
        else:
            self.mlp = mlp
            if design.startswith("ttt"):
                self.memory = TTTConfig(dim, num_heads=4, mini_batch=chunk, gate_init=1.0,
                                        target="next" if design == "ttt-next" else "same").build()
            elif design == "gdn":
                self.memory = GatedDeltaNetConfig(dim, num_heads=4, chunk_size=chunk, gate_init=1.0).build()
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        prev = F.pad(tokens[:, :-1], (1, 0), value=0)
        x = self.emb(tokens) + self.emb_prev(prev)
        n = self.norm(x)
        y = self.mlp(n)[0] if self.design == "inplace" else self.mlp(n)
        if self.memory is not None:
            y = y + self.memory(n)[0]
        if self.attn is not None:
            y = y + self.attn(n)
        return self.head(self.head_norm(x + y))


def value_losses(model: RecallModel, tokens: Tensor, first: Tensor, query: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Cross-entropy of the value at its first showing and at its query [B, P], and query accuracy [B, P]."""
    logits = model(tokens)
    P = first.numel()

    def at(frames: Tensor) -> tuple[Tensor, Tensor]:
        lg, target = logits[:, frames], tokens[:, frames + 1]
        return F.cross_entropy(lg.flatten(0, 1), target.flatten(), reduction="none").view(-1, P), lg.argmax(-1) == target

    (l_first, _), (l_query, hit) = at(first), at(query)
    return l_first, l_query, hit.float()


Watch = tp.Callable[[int, RecallModel], None]


def train(design: str, task: RecallTask, steps: int = 300, batch: int = 32, gaps: tuple[int, int] = (8, 48),
          lr: float = 3e-3, seed: int = 0, window: int = 0, watch: Watch | None = None,
          every: int = 0) -> RecallModel:
    """Train on the value losses (first showing: learns chance; query: learns to recall), a new gap in
    [gaps] each step; `watch(step, model)` every `every` steps."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = RecallModel(design, task.vocab, window=window)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for step in range(1, steps + 1):
        gap = int(torch.randint(gaps[0], gaps[1] + 1, (1,), generator=g))
        tokens, first, query = task.sample(batch, gap, g)
        l_first, l_query, _ = value_losses(model, tokens, first, query)
        opt.zero_grad()
        (l_first.mean() + l_query.mean()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if watch is not None and every and step % every == 0:
            watch(step, model)
            model.train()
    return model


@torch.no_grad()
def evaluate(model: RecallModel, task: RecallTask, gap: int, batch: int = 256, seed: int = 1) -> dict[str, float]:
    """Query vs first-showing loss (change in %, < 0: stored; its bootstrap 95 % interval over sequences) and
    query accuracy, on new sequences."""
    tokens, first, query = task.sample(batch, gap, torch.Generator().manual_seed(seed))
    l_first, l_query, hit = value_losses(model.eval(), tokens, first, query)
    ones = np.ones(batch)
    change, low, high = (100 * (x - 1) for x in tp.cast(tuple[float, float, float], ratio_interval(
        l_query.sum(1).double().numpy(), ones, l_first.sum(1).double().numpy(), ones)))
    return {"gap": gap, "loss_first": float(l_first.mean()), "loss_query": float(l_query.mean()),
            "change_pct": change, "low_pct": low, "high_pct": high, "accuracy": float(hit.mean())}


def compare(designs: tuple[str, ...] = DESIGNS, eval_gaps: tuple[int, ...] = (16, 64, 160, 640),
            task: RecallTask | None = None, curve_gap: int | None = None, every: int = 0,
            **train_kw: tp.Any) -> tuple[list[dict[str, tp.Any]], list[dict[str, tp.Any]]]:
    """Train every design on the same stream and seed: one row per (design, gap) after training, and one per
    (design, step) at `curve_gap` every `every` steps (the training curve)."""
    task = task or RecallTask()
    rows: list[dict[str, tp.Any]] = []
    curve: list[dict[str, tp.Any]] = []
    for design in designs:
        def watch(step: int, model: RecallModel) -> None:
            curve.append({"design": design, "step": step, **evaluate(model, task, tp.cast(int, curve_gap))})

        start = time.perf_counter()
        model = train(design, task, watch=watch if curve_gap is not None else None, every=every, **train_kw)
        seconds = time.perf_counter() - start
        rows += [{"design": design, "train_s": round(seconds, 1), **evaluate(model, task, gap)} for gap in eval_gaps]
    return rows, curve
