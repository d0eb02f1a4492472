"""The line `generate` prints about the memory: a passage heard again 10 attention windows later, with and without it.

A newcomer's first command should show the memory at work, not only that the model streams. So a held-out
speech clip ships with the package and becomes one copy probe (`spans.copy_probes`): 64 frames of
context, a 32-frame passage (2.6 s), other speech, and the passage again 10x the model's attention
window after it first began, out of attention's reach. The probe is teacher-forced through the model
(`MoshiScorer` in segments: no sampling, a few seconds on a CPU) twice, by `long_context.evaluate_copies`
with its memory-reset control: with the memory as it is, and with every memory state restarted right
after the first hearing (attention keeps its window). The passage's second hearing is scored as
`eval-long --copy-controls` scores it: text words (pads excluded) and codebook 0, in nats per token.

The clip (`assets/held_out_speech.npy`, int16 [17, 2656]) is the first 2656 frames (3.5 min) of
`devil/readings/reading_006.wav`, a held-out (val) reading of the issue-24 evidence corpus
(`make-corpus`, flite voices) tokenized with the shipped codec and tokenizer (`recipes/evidence24/tok24.py`:
text, the model's 8 codebooks, then the user's 8, which are Mimi's codes of silence). The user rows are
kept: they are what the model reads while the user is silent, and they never settle into a repeat that
could be rebuilt. It reads as the shipped model's tokens, so a model is probed only when it reads the
same layout (the same Mimi and tokenizer files beside it); otherwise the check is skipped with the reason.
"""

from __future__ import annotations

import filecmp
import time
import typing as tp
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ttt_speech.audio import FRAME_RATE
from ttt_speech.eval.copies import GROUPS as COPY_GROUPS

CLIP = Path(__file__).resolve().parents[1] / "assets" / "held_out_speech.npy"
CONTEXT, SPAN, WINDOWS = 64, 32, 10  # frames before the passage, passage frames, gap in attention windows
SEGMENT = 256  # frames per teacher-forced forward
GROUPS = COPY_GROUPS[:2]  # the copy probe's "text words" and "codebook 0": what the line reports
COMPANIONS = {"mimi_name": "Mimi (codec)", "tokenizer_name": "text tokenizer"}


@dataclass
class MemoryCheck:
    """What the check found: "ok" (numbers), "none" (the model has no memory) or "skipped" (`reason`)."""

    status: str
    reason: str = ""
    window: int | None = None  # attention window (frames); 0: no attention layers
    gap: int | None = None  # frames from the passage's first hearing to its second
    span: int = SPAN
    with_memory: dict[str, float | None] = field(default_factory=dict)  # group -> nats per token, second hearing
    reset: dict[str, float | None] = field(default_factory=dict)  # ... with the memory reset after the first
    first: dict[str, float | None] = field(default_factory=dict)  # ... on the first hearing
    seconds: float = 0.0

    def change(self, group: str) -> float | None:
        """Relative loss change (with memory / reset - 1); < 0: the memory recalls the passage."""
        a, b = self.with_memory.get(group), self.reset.get(group)
        return a / b - 1 if a is not None and b else None

    def line(self) -> str:
        """One sentence a newcomer can read (nats: lower means the model predicted the passage better)."""
        if self.status == "none":
            window = f"its {_seconds(self.window)} attention window" if self.window else "its attention"
            return f"memory: none (attention only): nothing that leaves {window} can be recalled"
        if self.status == "skipped":
            return f"memory check skipped: {self.reason}"
        where = (f"{WINDOWS}x the {_seconds(self.window)} attention window" if self.window else
                 "no attention: only the memory reaches back")
        text, cb0 = (self.with_memory["text words"], self.reset["text words"]), \
            (self.with_memory["codebook 0"], self.reset["codebook 0"])
        return (f"memory: a {_seconds(self.span)} passage heard again {_seconds(self.gap)} later ({where}) costs "
                f"{text[0]:.2f} nats/word with the memory, {text[1]:.2f} with it reset after the first "
                f"hearing ({_percent(self.change('text words'))}; codebook 0: {cb0[0]:.2f} vs {cb0[1]:.2f} nats/frame, "
                f"{_percent(self.change('codebook 0'))})")

    def to_dict(self) -> dict[str, tp.Any]:
        return asdict(self) | {"change": {g: self.change(g) for g in self.with_memory}}


def _seconds(frames: int | None) -> str:
    s = (frames or 0) / FRAME_RATE
    return f"{s / 60:.1f} min" if s >= 100 else f"{s:.1f} s" if s < 10 else f"{s:.0f} s"


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f} %" if abs(x) < 0.01 else f"{100 * x:+.0f} %"


def memory_layers(lm: nn.Module) -> int:
    """How many of the temporal transformer's layers carry a memory branch."""
    from ttt_speech.moshi.layer import HybridTransformerLayer

    return sum(isinstance(layer, HybridTransformerLayer) for layer in lm.transformer.layers)


def layout_problem(lm: nn.Module, clip: np.ndarray, model_dir: Path | None, config: dict[str, tp.Any] | None) -> str | None:
    """Why the clip's tokens are not this model's, or None: the rows and vocabularies must cover the clip, and
    the Mimi and tokenizer beside the model must be the shipped ones (the codec the clip was made with)."""
    from ttt_speech.moshi.config import read_moshi_config
    from ttt_speech.moshi.files import SHIPPED_DIR, companion

    if model_dir is None or config is None:
        return "the model is built in code; the shipped clip holds the shipped codec's tokens"
    if lm.num_codebooks != clip.shape[0] or lm.text_card <= clip[0].max() or lm.card <= clip[1:].max():
        return (f"the model reads {lm.num_codebooks} token rows ({lm.text_card} text ids, {lm.card} audio codes); "
                f"the shipped clip has {clip.shape[0]} rows of the shipped codec's tokens")
    shipped = read_moshi_config(SHIPPED_DIR / "config.json")
    for key, what in COMPANIONS.items():
        mine, ours = companion(model_dir, config, key), companion(SHIPPED_DIR, shipped, key)
        if mine is None:
            return f"no {what} beside {model_dir}: cannot tell whether it reads the shipped clip's tokens"
        if ours is None or not filecmp.cmp(mine, ours, shallow=False):
            return f"the {what} beside {model_dir} is not the shipped one, so its tokens are not the shipped clip's"
    return None


def check_memory(lm: nn.Module, model_dir: Path | None = None, config: dict[str, tp.Any] | None = None,
                 clip_path: Path = CLIP) -> MemoryCheck:
    """The probe on `lm` (a Moshi, hybrid or not), `model_dir`/`config` being where it was loaded from."""
    from ttt_speech.eval.data import Sequence
    from ttt_speech.eval.long_context import evaluate_copies
    from ttt_speech.eval.models import MoshiScorer, moshi_attention_window
    from ttt_speech.eval.spans import copy_probes

    window = moshi_attention_window(lm)
    if not memory_layers(lm):
        return MemoryCheck("none", window=window)
    if window is None:
        return MemoryCheck("skipped", "attention sees the whole past: there is no window to recall beyond")
    clip = np.load(clip_path)
    problem = layout_problem(lm, clip, model_dir, config)
    if problem:
        return MemoryCheck("skipped", problem, window)
    gap = WINDOWS * window if window else clip.shape[1] - CONTEXT - SPAN
    if CONTEXT + gap + SPAN > clip.shape[1]:
        return MemoryCheck("skipped", f"{WINDOWS}x the {window}-frame attention window needs {CONTEXT + gap + SPAN} "
                                      f"frames; the shipped clip holds {clip.shape[1]}", window)
    start = time.perf_counter()
    probes, spans = copy_probes([Sequence("held_out_speech", torch.from_numpy(clip.astype(np.int64)))], [gap], SPAN,
                                CONTEXT, 1)
    scorer = MoshiScorer(lm, "generate", segment=SEGMENT)
    entry = evaluate_copies(scorer, probes, spans, reset=True, progress=False, boot=1)[gap]
    again, reset, first = ({g: entry[key][g] for g in GROUPS} for key in ("again", "again (reset)", "first"))
    return MemoryCheck("ok", "", window, gap, SPAN, again, reset, first, time.perf_counter() - start)
