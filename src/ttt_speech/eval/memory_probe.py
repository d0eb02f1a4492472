"""`ttt-speech probe-memory`: does a TTT hybrid's inner model *store* a span it has seen?

`eval-long --copy-gaps` asks whether the whole model predicts a copied span better. This asks one
step earlier whether the TTT state holds the span at all. For each TTT layer it replays the inner
model's updates on the k, v and step sizes that the layer computed while the model streamed a
held-out excerpt. It takes every token's inner loss 1/2 ||LN(k W + b) - (v - k)||^2 at the weights
that token met (its mini-batch's start), in two cases:

- on a span copied G frames after its source (the source seen G frames earlier);
- on the same span at the same place, with its source replaced by the frames that follow the
  excerpt (the control: same content, same amount of learning, never seen).

An in-place layer (`InPlaceLayer`, docs/ttt.md) has no inner loss to replay: its writes are Hebbian,
with no target scale. For it the per-frame loss is the read error 1 - cos(Delta k_t, v_t): how far
the memory's read with a pair's key (the MLP hidden of frame t-1), at the delta frame t met, points
from the pair's value (1 in the first chunk, where nothing is written yet).

"copy vs never seen" < 0 means the state kept something of the span. There are two excerpts per
held-out sequence and gap, each rounded up to whole mini-batches (only those are replayed); the
first mini-batch of each span is left out (it holds the splice).
Linear inner models only. The model streams on the CPU: the reference step path computes the
inputs this records (CUDA's fused step kernel does not pass through it).

    ttt-speech probe-memory --data held_out/ HYBRID_DIR [NAME=DIR ...] [--gaps 300,1000,3000]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import typing as tp

import torch
import torch.nn.functional as F
from torch import Tensor

from ttt_speech.errors import UsageError
from ttt_speech.eval.data import Sequence, load_sequences
from ttt_speech.eval.models import load_model
from ttt_speech.layers.inplace import InPlaceLayer
from ttt_speech.layers.ttt import TTTLayer
from ttt_speech.ops.inplace import inplace_parallel
from ttt_speech.ops.ttt.reference import inner_forward, layer_norm, ttt_chunked

# id(layer) -> per call: TTT [k, v, a, c], each [B, H, t, D] / [B, H, t]; in-place [k, v], [B, t, hidden / dim]
Calls = dict[int, list[list[Tensor]]]
MemoryLayer = tp.Union[TTTLayer, InPlaceLayer]


@contextlib.contextmanager
def record_inner_inputs(layers: tp.Iterable[MemoryLayer]) -> tp.Iterator[Calls]:
    """Record what each layer's memory learns from while inside: a TTT layer's inner k, v and step sizes (its
    `register_inner_hook`), an in-place layer's keys and values (its `register_pair_hook`)."""
    calls: Calls = {}

    def keep(layer: MemoryLayer, q: Tensor, k: Tensor, v: Tensor, *steps: Tensor) -> None:
        calls.setdefault(id(layer), []).append([t.clone() for t in (k, v, *steps)])

    handles = [layer.register_inner_hook(keep) if isinstance(layer, TTTLayer) else layer.register_pair_hook(keep)
               for layer in layers]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def replay_inner_losses(layer: TTTLayer, calls: Calls) -> tuple[Tensor, Tensor, Tensor]:
    """Each token's inner loss at its mini-batch's boundary weights [B, H, T] (NaN after the last whole
    mini-batch), and the weights after it: the recorded inputs replayed one mini-batch at a time through
    the reference TTT math (`ops.ttt.reference`), the losses taken at the weights each mini-batch starts from."""
    if layer.config.inner != "linear":
        raise UsageError("probe-memory replays linear inner models only")
    if id(layer) not in calls:
        raise RuntimeError("no TTT inputs were recorded (the fused CUDA step bypasses them: stream on the CPU)")
    k, v, a, c = (torch.cat([call[i] for call in calls[id(layer)]], dim=2) for i in range(4))
    ln_w, ln_b = (t.float() for t in layer.inner_norm())
    B, H, T, D = k.shape
    K = layer.config.mini_batch
    weights = [layer.W1.float().expand(B, H, D, D), layer.b1.float().expand(B, H, 1, D)]
    zeros = [torch.zeros_like(w) for w in weights]
    start = torch.zeros(B, dtype=torch.long)
    loss = torch.full((B, H, T), torch.nan)
    for n in range(T // K):
        s = slice(n * K, (n + 1) * K)
        kk, vv = k[:, :, s], v[:, :, s]
        _, zs = inner_forward(kk, weights)
        loss[:, :, s] = 0.5 * ((layer_norm(zs[-1], ln_w[:, None], ln_b[:, None], layer.config.eps) - (vv - kk)) ** 2).sum(-1)
        _, weights, _, _ = ttt_chunked(kk, kk, vv, a[:, :, s], c[:, :, s], ln_w, ln_b, weights, zeros, start, K,
                                       eps=layer.config.eps)
    return loss, weights[0], weights[1]


def replay_read_errors(layer: InPlaceLayer, calls: Calls) -> Tensor:
    """Each frame's read error 1 - cos(Delta_{c(t)} k_t, v_t) [B, T] for an in-place layer: its recorded pairs
    written chunk by chunk from a zero delta (`ops.inplace.parallel` with the keys as queries)."""
    if id(layer) not in calls:
        raise RuntimeError("no in-place pairs were recorded")
    k, v = (torch.cat([call[i] for call in calls[id(layer)]], dim=1) for i in range(2))
    (B, T, Fh), D, C = k.shape, v.shape[-1], layer.config.chunk
    read, *_ = inplace_parallel(k, k, v, k.new_zeros(B, D, Fh), k.new_zeros(B, C, Fh), v.new_zeros(B, C, D),
                                torch.zeros(B, dtype=torch.long, device=k.device), C)
    return 1 - F.cosine_similarity(read, v, dim=-1)  # a zero read (nothing written yet) has cosine 0


def copy_and_control(sequences: list[Sequence], gap: int, span: int, context: int,
                     mini_batch: int = 1) -> tuple[Tensor, Tensor]:
    """([N, rows, L] excerpts with the span at `context` copied `gap` later; the same with that source
    replaced by the `span` frames after the excerpt), two excerpts per sequence. L is context + gap +
    span rounded up to whole mini-batches (only those are replayed), the copy followed by the original."""
    if gap < span:
        raise UsageError(f"gap {gap} < span {span}: the copy would overlap its source")
    L = -(-(context + gap + span) // mini_batch) * mini_batch
    src, dst = context, context + gap
    copied, control = [], []
    for seq in sequences:
        if seq.length < 2 * L + span:
            raise UsageError(f"{seq.name}: {seq.length} frames; gap {gap} needs {2 * L + span} "
                             f"(two excerpts of context {context} + gap + span {span}, and a stand-in span)")
        for lo in (0, L):
            x = seq.tokens[:, lo:lo + L].clone()
            x[:, dst:dst + span] = x[:, src:src + span]
            y = x.clone()
            y[:, src:src + span] = seq.tokens[:, lo + L:lo + L + span]
            copied += [x]
            control += [y]
    return torch.stack(copied), torch.stack(control)


@dataclasses.dataclass
class ProbeRow:
    gap: int
    layer: int  # index among the model's memory layers (TTT or in-place)
    source: float  # mean inner loss (in-place: read error) on the span the first time
    copy: float  # ... on its copy
    never_seen: float  # ... on the copy when the source was replaced

    @property
    def change(self) -> float:
        return self.copy / self.never_seen - 1


def probe(scorer: tp.Any, sequences: list[Sequence], gaps: list[int], span: int = 200,
          context: int = 250) -> list[ProbeRow]:
    """ProbeRows per gap and memory layer of a Moshi scorer's model (see the module docstring)."""
    layers = [m for m in scorer.model.modules() if isinstance(m, (TTTLayer, InPlaceLayer))]
    if not layers:
        raise UsageError(f"{scorer.name}: no TTT or in-place layers")
    K = layers[0].config.mini_batch if isinstance(layers[0], TTTLayer) else layers[0].config.chunk
    first = slice(context + K, context + span)  # the source span, past its first mini-batch
    rows = []
    for gap in gaps:
        again = slice(first.start + gap, first.stop + gap)
        losses = []
        for tokens in copy_and_control(sequences, gap, span, context, K):
            with record_inner_inputs(layers) as calls, torch.no_grad():
                scorer.score(tokens, torch.full((tokens.shape[0], len(scorer.streams), tokens.shape[-1]), torch.nan),
                             lambda step: None)
            losses.append([replay_inner_losses(layer, calls)[0] if isinstance(layer, TTTLayer)
                           else replay_read_errors(layer, calls) for layer in layers])
        for i, (loss, ctrl) in enumerate(zip(*losses)):
            rows.append(ProbeRow(gap, i, *(x.nanmean().item() for x in (loss[..., first], loss[..., again],
                                                                            ctrl[..., again]))))
    return rows


def run(args: argparse.Namespace) -> list[ProbeRow]:
    """`ttt-speech probe-memory` (arguments: eval/commands.py, add_probe_arguments): print a markdown table per
    model; returns every row."""
    sequences = load_sequences(args.data)
    gaps = args.gaps
    everything: dict[str, list[ProbeRow]] = {}
    for spec in args.models:
        scorer = load_model(spec).scorer
        for m in scorer.model.modules():
            if isinstance(m, (TTTLayer, InPlaceLayer)):
                m.config = dataclasses.replace(m.config, base_lr=m.config.base_lr * args.inner_lr_scale)
        rows = everything[scorer.name] = probe(scorer, sequences, gaps, args.span, args.context)
        print(f"\n## {scorer.name}, inner lr x{args.inner_lr_scale:g}\n\n| gap | memory layer | source | copy | "
              "copy, source never seen | copy vs never seen |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r.gap} | {r.layer} | {r.source:.3f} | {r.copy:.3f} | {r.never_seen:.3f} | {r.change:+.1%} |",
                  flush=True)
    if args.out:
        args.out.write_text(json.dumps({name: [dataclasses.asdict(r) | {"change": r.change} for r in rows]
                                        for name, rows in everything.items()}, indent=1) + "\n")
    return [r for rows in everything.values() for r in rows]
