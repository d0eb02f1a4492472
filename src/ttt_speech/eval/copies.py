"""Copy-probe statistics that can see recall: loss per stream group, per probe, with bootstrap intervals.

A mean over every stream blurs recall away: text padding frames are trivially predicted with or
without memory, and training weighs codebook 0 x100 while codebooks 1-7 (the depformer's) copy
last. So each probe's loss is summed separately over three groups:

- "text words": the text stream where the target is a word token (padding and end-of-padding excluded),
- "codebook 0": the first audio codebook (semantic, the one training weighs most),
- "codebooks 1-7": the other audio codebooks of the model's own voice;

on the source span ("first") and on its copy ("again"). The copy / first ratio of a group pools
all probes of a gap (sum of losses / number of tokens, each side); its 95 % interval is the
percentile bootstrap over probes (resampled in pairs, as a probe's two spans belong together).

Controls (issue 24) are the same probes scored another way, so they pair probe by probe:
- source replaced: the source span is other speech, the copy is unchanged: the copy's loss with the
  same place and the same amount of adaptation but nothing to recall;
- memory reset: the memory branches' states restart right after the source span (attention keeps
  its window): whatever recall survives is attention's, not the memory's.
"""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ttt_speech.eval.spans import Span

GROUPS = ("text words", "codebook 0", "codebooks 1-7")
KINDS = ("first", "again")  # the source span, its copy


def group_masks(tokens: Tensor, streams: int, pads: tuple[int, ...]) -> Tensor:
    """[len(GROUPS), streams, T] bool: which scored (stream, position) belongs to each group.

    tokens: one sequence's [rows, T] targets (row s = scored stream s); pads: the text ids that are
    not words (Moshi: padding and end-of-padding).
    """
    T = tokens.shape[-1]
    out = torch.zeros(len(GROUPS), streams, T, dtype=torch.bool)
    words = torch.ones(T, dtype=torch.bool)
    for p in pads:
        words &= tokens[0] != p
    out[0, 0] = words
    if streams > 1:
        out[1, 1] = True
        out[2, 2:] = True
    return out


@dataclass
class ProbeLosses:
    """Loss sum and token count per probe, span kind (first, again) and group."""

    gaps: np.ndarray  # [N] the probe's copy distance
    sums: np.ndarray  # [N, 2, G] float64
    counts: np.ndarray  # [N, 2, G] int64

    @classmethod
    def empty(cls) -> ProbeLosses:
        return cls(np.zeros(0, np.int64), np.zeros((0, 2, len(GROUPS))), np.zeros((0, 2, len(GROUPS)), np.int64))

    def add(self, losses: Tensor, tokens: Tensor, first: Span, again: Span, pads: tuple[int, ...]) -> None:
        """One probe: its [S, T] losses (NaN: not scored), [rows, T] tokens, its source and copy spans."""
        masks = group_masks(tokens, losses.shape[0], pads) & ~torch.isnan(losses)
        values = torch.nan_to_num(losses).double()
        sums = np.zeros((1, 2, len(GROUPS)))
        counts = np.zeros((1, 2, len(GROUPS)), np.int64)
        for k, span in enumerate((first, again)):
            m = masks[:, :, span.start:span.end]
            sums[0, k] = (values[None, :, span.start:span.end] * m).sum((1, 2)).numpy()
            counts[0, k] = m.sum((1, 2)).numpy()
        self.gaps = np.append(self.gaps, again.start - first.start)
        self.sums = np.concatenate([self.sums, sums])
        self.counts = np.concatenate([self.counts, counts])


def ratio_interval(num_sums: np.ndarray, num_counts: np.ndarray, den_sums: np.ndarray, den_counts: np.ndarray,
                   boot: int = 2000, seed: int = 0) -> tuple[float | None, float | None, float | None]:
    """(ratio, 2.5 %, 97.5 %) of mean(num) / mean(den), each a pooled mean over probes (loss sum / token
    count), the interval by resampling probes with replacement (pairs kept together)."""
    def ratio(idx: np.ndarray | slice) -> np.ndarray:
        n = num_sums[idx].sum(-1) / np.maximum(num_counts[idx].sum(-1), 1)
        d = den_sums[idx].sum(-1) / np.maximum(den_counts[idx].sum(-1), 1)
        return n / np.where(d > 0, d, np.nan)

    if num_counts.sum() == 0 or den_counts.sum() == 0:
        return None, None, None
    point = float(ratio(slice(None)))
    n = len(num_sums)
    idx = np.random.default_rng(seed).integers(0, n, (boot, n))
    samples = ratio(idx)
    lo, hi = np.nanpercentile(samples, [2.5, 97.5])
    return point, float(lo), float(hi)


def _means(sums: np.ndarray, counts: np.ndarray, kind: int) -> dict[str, float | None]:
    """group -> mean loss over the probes' spans of one kind (pooled: loss sum / token count)."""
    return {g: (float(sums[:, kind, i].sum() / counts[:, kind, i].sum()) if counts[:, kind, i].sum() else None)
            for i, g in enumerate(GROUPS)}


def summarize(probes: ProbeLosses, controls: dict[str, ProbeLosses] | None = None, boot: int = 2000,
              seed: int = 0) -> dict[int, dict[str, tp.Any]]:
    """gap -> {"probes": n, "first"/"again": {group: mean loss}, "ratio": {group: [r, lo, hi]} (again / first),
    and per control c: "again/<c>": {group: [r, lo, hi]} (again / the control's again, probe by probe) and
    "again (<c>)": {group: the control's own mean loss on the copy}}."""
    out: dict[int, dict[str, tp.Any]] = {}
    for gap in sorted(set(probes.gaps.tolist())):
        sel = probes.gaps == gap
        s, c = probes.sums[sel], probes.counts[sel]
        entry: dict[str, tp.Any] = {"probes": int(sel.sum())}
        for k, kind in enumerate(KINDS):
            entry[kind] = _means(s, c, k)
        entry["ratio"] = {g: list(ratio_interval(s[:, 1, i], c[:, 1, i], s[:, 0, i], c[:, 0, i], boot, seed))
                          for i, g in enumerate(GROUPS)}
        for name, ctrl in (controls or {}).items():
            csel = ctrl.gaps == gap
            if not csel.any():  # this control does not apply at this gap
                continue
            if csel.sum() != sel.sum():
                raise ValueError(f"control {name!r}: {int(csel.sum())} probes at gap {gap}, expected {int(sel.sum())}")
            cs, cc = ctrl.sums[csel], ctrl.counts[csel]
            entry[f"again ({name})"] = _means(cs, cc, 1)
            entry[f"again/{name}"] = {g: list(ratio_interval(s[:, 1, i], c[:, 1, i], cs[:, 1, i], cc[:, 1, i], boot,
                                                             seed)) for i, g in enumerate(GROUPS)}
        out[gap] = entry
    return out
