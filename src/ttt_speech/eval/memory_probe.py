"""`ttt-speech probe-memory`: does a hybrid's memory *store* a span it has seen?

`eval-long --copy-gaps` asks whether the whole model predicts a copied span better. This asks one
step earlier whether the memory state holds the span at all. For each memory layer it replays the
memory's writes on the inputs the layer computed while the model ran a held-out excerpt, and takes
every frame's loss *at the state that frame met*, in two cases:

- on a span copied G frames after its source (the source seen G frames earlier);
- on the same span at the same place, with its source replaced by the frames that follow the
  excerpt (the control: same content, same amount of learning, never seen).

The per-frame loss is what the design's write minimises:
- TTT (`TTTLayer`, either target): the inner loss 1/2 ||LN(k W + b) - (v - k)||^2 at the weights of
  the frame's mini-batch start (with `target="next"` the recorded k is already the previous frame's);
- Gated DeltaNet (`GatedDeltaNetLayer`): the delta rule's regression loss 1/2 ||exp(g_t) S^T k_t - v_t||^2
  (k L2-normalised) at the state S before frame t's write;
- in-place (`InPlaceLayer`, docs/ttt.md): its writes are Hebbian, with no target scale, so the read
  error 1 - cos(Delta k_t, v_t): how far the memory's read with a pair's key (the MLP hidden of frame
  t-1), at the delta frame t met, points from the pair's value (1 in the first chunk).

"copy vs never seen" < 0 means the state kept something of the span; its 95 % interval is the
percentile bootstrap over excerpts (copy and control resampled in pairs). Per gap there is a row per
memory layer and one for their mean (each layer's change weighted equally). Gaps are frames
(`--gaps`) or multiples of the model's attention window (`--gaps-windows 1,4,10,40`). Each excerpt
is rounded up to whole mini-batches (only those are replayed); the first mini-batch (TTT) or chunk
(in-place) of each span is left out, as it holds the splice (at most half the span; one frame for
Gated DeltaNet, which writes every frame). Linear TTT inner models only.

A Moshi model runs its temporal transformer segment by segment (the training path, which equals
streaming frame by frame; the depformer is not needed), on the CPU or the GPU alike (the chunked
forms pass the recorded inputs on every device).

    ttt-speech probe-memory --data held_out/ NAME=DIR [NAME=DIR ...] --gaps-windows 1,4,10,40 --out probe.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import typing as tp
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ttt_speech.errors import UsageError
from ttt_speech.eval.copies import ratio_interval
from ttt_speech.eval.data import Sequence, load_sequences
from ttt_speech.eval.models import Scorer, load_model
from ttt_speech.layers.gated_deltanet import GatedDeltaNetLayer
from ttt_speech.layers.inplace import InPlaceLayer
from ttt_speech.layers.ttt import TTTLayer
from ttt_speech.ops.gated_deltanet.reference import l2_normalize
from ttt_speech.ops.inplace import inplace_chunked
from ttt_speech.ops.ttt.reference import inner_forward, layer_norm, ttt_chunked

# id(layer) -> per call: TTT [k, v, a, c], each [B, H, t, D] / [B, H, t]; GDN [k, v, g, beta], the same;
# in-place [k, v], [B, t, hidden / dim]
Calls = dict[int, list[list[Tensor]]]
MemoryLayer = tp.Union[TTTLayer, InPlaceLayer, GatedDeltaNetLayer]
MEMORY_LAYERS = (TTTLayer, InPlaceLayer, GatedDeltaNetLayer)


@contextlib.contextmanager
def record_inner_inputs(layers: tp.Iterable[MemoryLayer]) -> tp.Iterator[Calls]:
    """Record what each layer's memory learns from while inside: a TTT layer's inner k, v and step sizes, a Gated
    DeltaNet's k, v, decay and write strength, an in-place layer's keys and values (`register_inner_hook`)."""
    calls: Calls = {}

    def keep(layer: MemoryLayer, q: Tensor, k: Tensor, v: Tensor, *steps: Tensor) -> None:
        calls.setdefault(id(layer), []).append([t.clone() for t in (k, v, *steps)])

    handles = [layer.register_inner_hook(keep) for layer in layers]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _recorded(layer: MemoryLayer, calls: Calls, time_dim: int) -> list[Tensor]:
    if id(layer) not in calls:
        raise RuntimeError(f"no inputs of this {type(layer).__name__} were recorded")
    return [torch.cat(parts, dim=time_dim) for parts in zip(*calls[id(layer)])]


def replay_inner_losses(layer: TTTLayer, calls: Calls) -> tuple[Tensor, Tensor, Tensor]:
    """Each token's inner loss at its mini-batch's boundary weights [B, H, T] (NaN after the last whole
    mini-batch), and the weights after it: the recorded inputs replayed one mini-batch at a time through
    the reference TTT math (`ops.ttt.reference`), the losses taken at the weights each mini-batch starts from."""
    if layer.config.inner != "linear":
        raise UsageError("probe-memory replays linear inner models only")
    k, v, a, c = _recorded(layer, calls, 2)
    ln_w, ln_b = (t.float() for t in layer.inner_norm())
    B, H, T, D = k.shape
    K = layer.config.mini_batch
    weights = [layer.W1.float().expand(B, H, D, D), layer.b1.float().expand(B, H, 1, D)]
    zeros = [torch.zeros_like(w) for w in weights]
    start = torch.zeros(B, dtype=torch.long, device=k.device)
    loss = torch.full((B, H, T), torch.nan, device=k.device)
    for n in range(T // K):
        s = slice(n * K, (n + 1) * K)
        kk, vv = k[:, :, s], v[:, :, s]
        _, zs = inner_forward(kk, weights)
        loss[:, :, s] = 0.5 * ((layer_norm(zs[-1], ln_w[:, None], ln_b[:, None], layer.config.eps) - (vv - kk)) ** 2).sum(-1)
        _, weights, _, _ = ttt_chunked(kk, kk, vv, a[:, :, s], c[:, :, s], ln_w, ln_b, weights, zeros, start, K,
                                       eps=layer.config.eps)
    return loss, weights[0], weights[1]


def replay_delta_losses(layer: GatedDeltaNetLayer, calls: Calls) -> tuple[Tensor, Tensor]:
    """Each frame's delta-rule loss 1/2 ||exp(g_t) S_{t-1}^T k_t - v_t||^2 [B, H, T] at the state before its
    write, and the state after the last frame: the recorded inputs replayed frame by frame from zeros (the
    recurrence of `ops.gated_deltanet.naive`, which writes beta_t times this loss's negative gradient)."""
    k, v, g, beta = _recorded(layer, calls, 2)
    k = l2_normalize(k)
    B, H, T, Dk = k.shape
    S = k.new_zeros(B, H, Dk, v.shape[-1])
    loss = k.new_empty(B, H, T)
    for t in range(T):
        S = S * g[:, :, t].exp()[..., None, None]
        error = torch.einsum("bhkv,bhk->bhv", S, k[:, :, t]) - v[:, :, t]
        loss[:, :, t] = 0.5 * error.pow(2).sum(-1)
        S = S - torch.einsum("bhk,bhv->bhkv", k[:, :, t], beta[:, :, t, None] * error)
    return loss, S


def replay_read_errors(layer: InPlaceLayer, calls: Calls) -> Tensor:
    """Each frame's read error 1 - cos(Delta_{c(t)} k_t, v_t) [B, T] for an in-place layer: its recorded pairs
    written chunk by chunk from a zero delta (`ops.inplace.reference` with the keys as queries: O(T) where the
    attention form is O(T^2)), faded by the layer's own decay as its stream fades them."""
    k, v = _recorded(layer, calls, 1)
    (B, _, Fh), D, C = k.shape, v.shape[-1], layer.config.chunk
    read, *_ = inplace_chunked(k, k, v, k.new_zeros(B, D, Fh), k.new_zeros(B, C, Fh), v.new_zeros(B, C, D),
                               torch.zeros(B, dtype=torch.long, device=k.device), C, layer.decay(k.dtype))
    return 1 - F.cosine_similarity(read, v, dim=-1)  # a zero read (nothing written yet) has cosine 0


def replay(layer: MemoryLayer, calls: Calls) -> Tensor:
    """Per-frame losses of one layer's memory [B, (H,) T] (see the module docstring)."""
    if isinstance(layer, TTTLayer):
        return replay_inner_losses(layer, calls)[0]
    if isinstance(layer, GatedDeltaNetLayer):
        return replay_delta_losses(layer, calls)[0]
    return replay_read_errors(layer, calls)


def write_period(layer: MemoryLayer) -> int:
    """Frames between the memory's writes: the TTT mini-batch, the in-place chunk, 1 for Gated DeltaNet."""
    if isinstance(layer, TTTLayer):
        return layer.config.mini_batch
    return layer.config.chunk if isinstance(layer, InPlaceLayer) else 1


def design_name(layers: list[MemoryLayer]) -> str:
    """The memory design, as the tables name it: "TTT ttt-lm", "TTT ttt-lm, next-frame targets", "in-place",
    "Gated DeltaNet" (joined with " + " if a model mixes them)."""
    names = []
    for layer in layers:
        if isinstance(layer, TTTLayer):
            name = f"TTT {layer.config.variant}" + (", next-frame targets" if layer.config.target == "next" else "")
        else:
            name = "in-place" if isinstance(layer, InPlaceLayer) else "Gated DeltaNet"
        names += [name] if name not in names else []
    return " + ".join(names)


def copy_and_control(sequences: list[Sequence], gap: int, span: int, context: int,
                     mini_batch: int = 1, per_sequence: int = 2) -> tuple[Tensor, Tensor]:
    """([N, rows, L] excerpts with the span at `context` copied `gap` later; the same with that source
    replaced by the `span` frames after the excerpt), `per_sequence` excerpts from each sequence long enough
    for them (the others are left out at this gap). L is context + gap + span rounded up to whole
    mini-batches (only those are replayed), the copy followed by the original."""
    if gap < span:
        raise UsageError(f"gap {gap} < span {span}: the copy would overlap its source")
    L = -(-(context + gap + span) // mini_batch) * mini_batch
    need = per_sequence * L + span
    long_enough = [seq for seq in sequences if seq.length >= need]
    if not long_enough:
        longest = max(sequences, key=lambda seq: seq.length)
        raise UsageError(f"{longest.name}, the longest held-out sequence: {longest.length} frames; gap {gap} needs "
                         f"{need} ({per_sequence} excerpts of context {context} + gap + span {span}, and a stand-in "
                         "span): give shorter gaps, fewer --excerpts or longer held-out sequences")
    src, dst = context, context + gap
    copied, control = [], []
    for seq in long_enough:
        for lo in range(0, per_sequence * L, L):
            x = seq.tokens[:, lo:lo + L].clone()
            x[:, dst:dst + span] = x[:, src:src + span]
            y = x.clone()
            y[:, src:src + span] = seq.tokens[:, lo + L:lo + L + span]
            copied += [x]
            control += [y]
    return torch.stack(copied), torch.stack(control)


@torch.no_grad()
def run_trunk(scorer: Scorer, tokens: Tensor, segment: int = 256) -> None:
    """Run the model over excerpts [N, rows, L] for what its memory layers see (the losses are not needed).
    Moshi: the temporal transformer only, `segment` frames at a time through `moshi.segments` (the training
    path; the tests hold what it records equal to the frame-by-frame scorer's); other models: their scorer."""
    if scorer.kind != "moshi":
        scorer.score(tokens, torch.full((tokens.shape[0], len(scorer.streams), tokens.shape[-1]), torch.nan),
                     lambda step: None)
        return
    from ttt_speech.moshi.segments import SegmentRunner, delayed_inputs, forward_segment

    lm = scorer.model
    T = tokens.shape[-1]
    inputs = delayed_inputs(lm, tokens[:, :lm.num_codebooks].to(lm.device))  # frame t reads column t
    runner = SegmentRunner(lm, scorer.attention_window or T)  # None: unbounded attention; 0: no attention layers
    for pos in range(0, T, segment):
        forward_segment(lm, inputs[:, :, pos:min(pos + segment, T)], pos, runner.layers_at(pos))


@dataclasses.dataclass
class ProbeRow:
    gap: int
    layer: int | None  # index among the model's memory layers; None: the mean over them
    source: float  # mean loss on the span the first time (the mean row: in units of each layer's never_seen)
    copy: float  # ... on its copy
    never_seen: float  # ... on the copy when the source was replaced
    low: float  # 95 % bootstrap interval of `change` over excerpts
    high: float
    excerpts: int
    design: str = ""
    windows: float | None = None  # the gap in attention windows

    @property
    def change(self) -> float:
        return self.copy / self.never_seen - 1


def _row(gap: int, layer: int | None, src: np.ndarray, copy: np.ndarray, ctrl: np.ndarray, **kw: tp.Any) -> ProbeRow:
    """A row from per-excerpt mean losses [N] (source, copy, control)."""
    ones = np.ones(len(copy))
    _, lo, hi = ratio_interval(copy, ones, ctrl, ones)
    return ProbeRow(gap, layer, float(src.mean()), float(copy.mean()), float(ctrl.mean()), tp.cast(float, lo) - 1,
                    tp.cast(float, hi) - 1, len(copy), **kw)


@torch.no_grad()
def probe(scorer: Scorer, sequences: list[Sequence], gaps: list[int], span: int = 200, context: int = 250,
          per_sequence: int = 2, batch: int = 32) -> list[ProbeRow]:
    """ProbeRows per gap: one per memory layer of the scorer's model, then their mean (see the module docstring)."""
    layers: list[MemoryLayer] = [m for m in scorer.model.modules() if isinstance(m, MEMORY_LAYERS)]
    if not layers:
        raise UsageError(f"{scorer.name}: no TTT, Gated DeltaNet or in-place layers")
    design, window = design_name(layers), scorer.attention_window
    K = write_period(layers[0])
    skip = min(K, span // 2)  # the splice: the span's first mini-batch, or half of a span shorter than two
    first = slice(context + skip, context + span)
    rows = []
    for gap in gaps:
        again = slice(first.start + gap, first.stop + gap)
        # per layer, [N] mean loss of each excerpt on: the source, the copy, the copy with its source replaced
        means: list[list[list[Tensor]]] = [[[], [], []] for _ in layers]
        copied, control = copy_and_control(sequences, gap, span, context, K, per_sequence)
        for lo in range(0, len(copied), batch):
            losses = []
            for tokens in (copied[lo:lo + batch], control[lo:lo + batch]):
                with record_inner_inputs(layers) as calls:
                    run_trunk(scorer, tokens)
                losses.append([replay(layer, calls).cpu() for layer in layers])
            for m, loss, ctrl in zip(means, *losses):
                for out, x in zip(m, (loss[..., first], loss[..., again], ctrl[..., again])):
                    out.append(x.flatten(1).nanmean(1).double())
        per_layer = [[torch.cat(x).numpy() for x in m] for m in means]
        kw = {"design": design, "windows": gap / window if window else None}
        rows += [_row(gap, i, *m, **kw) for i, m in enumerate(per_layer)]
        unit = [m[2].mean() for m in per_layer]  # each layer's mean never-seen loss: the layers weigh alike
        rows.append(_row(gap, None, *(sum(m[j] / u for m, u in zip(per_layer, unit)) / len(layers) for j in range(3)),
                         **kw))
    return rows


def plot(everything: dict[str, list[ProbeRow]], path: Path) -> Path:
    """Copy vs never seen (mean over memory layers, 95 % bootstrap bars) against the gap, one line per model;
    the x axis in attention windows when every row has one, else in frames."""
    from ttt_speech.eval.plots import _pyplot, _save

    plt = _pyplot()
    in_windows = all(r.windows for rows in everything.values() for r in rows)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, rows) in enumerate(everything.items()):
        mean = [r for r in rows if r.layer is None]
        x = np.array([r.windows if in_windows else r.gap for r in mean])
        mid, lo, hi = (100 * np.array(v) for v in zip(*((r.change, r.low, r.high) for r in mean)))
        ax.errorbar(x, mid, yerr=np.stack([mid - lo, hi - mid]), marker="o", capsize=3, color=f"C{i}",
                    label=f"{name} ({mean[0].design})")
    ax.axhline(0, color="k", lw=0.6)
    ax.axhline(-20, color="r", ls="--", lw=0.8, label="-20 % (issue 23: a design that stores)")
    ax.set_xscale("log")
    ticks = sorted({r.windows if in_windows else r.gap for rows in everything.values() for r in rows})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("gap (attention windows)" if in_windows else "gap (frames)")
    ax.set_ylabel("memory loss on the copy vs never seen (%)")
    ax.set_title("probe-memory: what the memory state keeps of a span")
    ax.legend(fontsize=7)
    return _save(fig, path)


def table(name: str, rows: list[ProbeRow]) -> str:
    """Markdown: one row per gap and memory layer (and their mean)."""
    lines = [f"\n## {name}: {rows[0].design}\n",
             "| gap | windows | memory layer | source | copy | copy, source never seen | copy vs never seen [95 %] |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.gap} | {'' if r.windows is None else f'{r.windows:g}'} | "
                     f"{'mean' if r.layer is None else r.layer} | {r.source:.3f} | {r.copy:.3f} | {r.never_seen:.3f} | "
                     f"{r.change:+.1%} [{r.low:+.1%}, {r.high:+.1%}] |")
    return "\n".join(lines)


def model_gaps(args: argparse.Namespace, scorer: Scorer) -> list[int]:
    """--gaps, or --gaps-windows times the model's attention window."""
    if not args.gaps_windows:
        return args.gaps
    if not scorer.attention_window:
        raise UsageError(f"--gaps-windows: {scorer.name} has no attention window; give --gaps in frames")
    return [round(m * scorer.attention_window) for m in args.gaps_windows]


def run(args: argparse.Namespace) -> list[ProbeRow]:
    """`ttt-speech probe-memory` (arguments: eval/commands.py, add_probe_arguments): print a markdown table per
    model; with --out, write the rows as JSON there and the plot beside it (.png); returns every row."""
    sequences = load_sequences(args.data, args.max_sequences)
    everything: dict[str, list[ProbeRow]] = {}
    for spec in args.models:
        scorer = load_model(spec, args.device).scorer
        for m in scorer.model.modules():
            if isinstance(m, (TTTLayer, InPlaceLayer)):
                m.config = dataclasses.replace(m.config, base_lr=m.config.base_lr * args.inner_lr_scale)
        rows = everything[scorer.name] = probe(scorer, sequences, model_gaps(args, scorer), args.span, args.context,
                                               args.excerpts, args.batch_size)
        print(table(f"{scorer.name}, inner lr x{args.inner_lr_scale:g}", rows), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)  # a new folder, as eval-long makes: not a traceback after the run
        args.out.write_text(json.dumps({name: [dataclasses.asdict(r) | {"change": r.change} for r in rows]
                                        for name, rows in everything.items()}, indent=1) + "\n")
        plot(everything, args.out.with_suffix(".png"))
    return [r for rows in everything.values() for r in rows]
