"""report/report.md (tables and the rules behind them), report/results.json, report/*.png."""

from __future__ import annotations

import json
import typing as tp
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ttt_speech.eval import plots
from ttt_speech.eval.conversation import ConversationResult
from ttt_speech.eval.free_run import FreeRunResult, MinuteAudio
from ttt_speech.eval.gibberish import GibberishThresholds
from ttt_speech.eval.long_context import ModelResult


@dataclass
class Report:
    """Everything one eval-long run found."""

    settings: dict[str, tp.Any]
    long_context: list[ModelResult] = field(default_factory=list)
    free_runs: list[FreeRunResult] = field(default_factory=list)
    conversations: list[ConversationResult] = field(default_factory=list)
    thresholds: GibberishThresholds = field(default_factory=GibberishThresholds)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, tp.Any]:
        return {
            "settings": self.settings, "notes": self.notes,
            "gibberish_thresholds": asdict(self.thresholds),
            "long_context": [r.to_dict() for r in self.long_context],
            "free_runs": [r.to_dict() for r in self.free_runs],
            "conversations": [r.to_dict() for r in self.conversations],
        }


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "–" if x is None else format(x, fmt)


def _mib(x: int | None) -> str:
    return "–" if x is None else f"{x / 2**20:.0f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _long_context_md(results: list[ModelResult]) -> list[str]:
    lines = ["## Teacher-forced long context", ""]
    rows = []
    for r in results:
        verdict = f"degrades at {r.degraded_at}" if r.degraded_at else ("OOM at " + str(r.oom_at) if r.oom_at else "holds")
        if r.degraded_at and r.oom_at:
            verdict += f", OOM at {r.oom_at}"
        rows.append([r.name, r.kind, str(r.attention_window), f"{r.baseline_length}", _f(r.baseline_loss),
                     _f(r.loss_inside_window), _f(r.loss_beyond_window), _f(r.window_gap, "+.3f"), verdict])
    lines += _table(["model", "kind", "attention window", "baseline length", "baseline loss", "loss inside window",
                     "loss beyond window", "beyond - inside", "verdict"], rows)
    lines += _span_md(results)
    lines += _copy_md(results) + _copy_md(results, quotes=True)
    for r in results:
        lines += ["", f"### {r.name}: per length ({', '.join(r.quality_streams)} stream(s); {r.sequences} sequences)", ""]
        lines += _table(["length", "status", "loss", "quality", "ratio to baseline", "ms / position", "peak MiB"], [
            [str(x.length), x.status, _f(x.loss), _f(x.quality, ".4f"), _f(x.ratio), _f(x.step_ms, ".2f"),
             _mib(x.peak_memory_bytes)] for x in r.lengths])
        if r.oom_message:
            lines += ["", f"Out of memory: `{r.oom_message}`"]
        lines += [f"- {n}" for n in r.notes]
        lines += ["", "Mean loss (nats) per position bucket; figures: `loss_vs_position_<stream>.png`.", ""]
        header = ["stream", *(f"[{lo},{hi})" for lo, hi in zip(r.bucket_edges[:-1], r.bucket_edges[1:]))]
        lines += _table(header, [[s, *(_f(m, ".2f") for m in r.bucket_loss[s])] for s in r.streams])
    return lines


def _span_md(results: list[ModelResult]) -> list[str]:
    """Re-read passages: loss the first time vs again (far beyond the window), and against the first model."""
    scored = [r for r in results if "again" in r.span_loss]
    if not scored:
        return []
    ref = scored[0]
    lines = ["", "### Re-read passages (content repeated from >= 10 minutes earlier)", "",
             f"Mean loss (nats) on the passages' first reading and on their re-reading; the last columns "
             f"compare the re-reading with {ref.name}'s (negative: lower loss).", ""]
    rows = []
    for r in scored:
        row = [r.name]
        for group in ("text", "audio"):
            first, again = r.span_loss["first"].get(group), r.span_loss["again"].get(group)
            base = ref.span_loss["again"].get(group)
            row += [_f(first), _f(again), _f(None if first is None or again is None else again / first - 1, "+.1%"),
                    _f(None if again is None or not base else again / base - 1, "+.1%")]
        rows.append(row)
    return lines + _table(["model", *(f"{g} {c}" for g in ("text", "audio") for c in (
        "first", "again", "again vs first", f"again vs {ref.name}"))], rows)


def _interval(x: list[float | None] | None) -> str:
    """"0.412 [0.398, 0.427]": a ratio and its bootstrap 95 % interval."""
    if not x or x[0] is None:
        return "–"
    return f"{x[0]:.3f} [{x[1]:.3f}, {x[2]:.3f}]"


def _copy_md(results: list[ModelResult], quotes: bool = False) -> list[str]:
    """Copy probes per gap and stream group: copy / first occurrence, copy / each control (with bootstrap
    95 % intervals over probes), and the copy's loss against the first model's. quotes: the quote probes instead
    (the model saying again what the user said), whose first occurrence is on the user's channel: no copy / first."""
    attr = "quote_loss" if quotes else "copy_loss"
    scored = [r for r in results if getattr(r, attr)]
    if not scored:
        return []
    ref = scored[0]
    gaps = sorted({g for r in scored for g in getattr(r, attr)})
    probes = {g: max(getattr(r, attr)[g]["probes"] for r in scored if g in getattr(r, attr)) for g in gaps}
    if quotes:
        head = ["", "### Recall of what the user said (the model quoting the user's sentence, G frames later)", "",
                "Loss on the model's quote / the same quote with a control (same probes, paired), with the bootstrap "
                "95 % interval over probes: below 1, the model recalls. Controls: the user's sentence replaced by "
                "another user sentence, and the memory states reset right after it; last row: the quote's loss "
                f"against {ref.name}'s. Quotes pooled by distance: gap G means G to 2G frames. Probes: "]
        keys = (("again/replaced", "quote / user replaced"), ("again/reset", "quote / memory reset"))
    else:
        head = ["", "### Recall at distance (spans copied verbatim G frames later)", "",
                "Loss on the copy / loss on the same span's first occurrence, with the bootstrap 95 % interval over "
                "probes: below 1, the model recalls. Controls (same probes, paired): the source replaced by other "
                "speech, and the memory states reset right after the source; last row: the copy's loss against "
                f"{ref.name}'s. Text words exclude padding. Probes per gap: "]
        keys = (("ratio", "copy / first"), ("again/replaced", "copy / source replaced"),
                ("again/reset", "copy / memory reset"))
    head[-1] += (", ".join(f"{g}: {n}" for g, n in probes.items()) + ". Attention windows: "
                 + ", ".join(f"{r.name} {r.attention_window}" for r in scored)
                 + ("." if quotes else ". Figure: `recall_vs_gap.png`."))
    lines = [*head, ""]
    groups = list(dict.fromkeys(grp for r in scored for d in getattr(r, attr).values() for grp in d["again"]))
    for group in groups:
        rows = []
        for r in scored:
            loss = getattr(r, attr)
            for key, what in keys:
                if any(key in d for d in loss.values()):
                    rows.append([f"{r.name}: {what}", *(_interval(loss.get(g, {}).get(key, {}).get(group))
                                                        for g in gaps)])
            if r is not ref:
                kind = "quote" if quotes else "copy"
                row = [f"{r.name}: {kind} vs {ref.name}'s {kind}"]
                for g in gaps:
                    again = loss.get(g, {}).get("again", {}).get(group)
                    base = getattr(ref, attr).get(g, {}).get("again", {}).get(group)
                    row.append(_f(again / base - 1 if again is not None and base else None, "+.1%"))
                rows.append(row)
        lines += ["", *_table([f"{group}", *(f"gap {g}" for g in gaps)], rows)]
    return lines


def _free_runs_md(runs: list[FreeRunResult], th: GibberishThresholds) -> list[str]:
    lines = ["", "## Free-running generation", "",
             (f"Gibberish thresholds: 4-gram repetition > {th.max_repetition} (loop); uniformity > "
              f"{th.max_uniformity} with >= {th.min_tokens_for_uniformity} words (garbage); pad ratio > "
              f"{th.max_pad_ratio} (silent); own perplexity > {th.max_own_ppl_ratio}x the first minute's (unsure). "
              "Definitions in `ttt_speech/eval/gibberish.py`."), "", "![free run](free_run.png)"]
    for r in runs:
        first = "never" if r.degraded_minute is None else f"minute {r.degraded_minute + 1}"
        lines += ["", f"### {r.name}: {r.frames} positions after a {r.prompt_frames}-position prompt; degrades: {first}", ""]
        audio = {a.minute: a for a in r.audio}
        rows = []
        for m in r.minutes:
            a = audio.get(m.minute)
            rows.append([str(m.minute + 1), str(m.text_tokens), _f(m.pad_ratio, ".2f"), _f(m.entropy_bits, ".2f"),
                         _f(m.uniformity, ".2f"), _f(m.repetition, ".2f"), _f(m.own_ppl, ".2f"),
                         _f(a.wer if a else None, ".2f"), _f(a.speaker_similarity if a else None, ".2f"),
                         ", ".join(m.flags) or "ok"])
        lines += _table(["minute", "words", "pad ratio", "entropy bits", "uniformity", "repetition", "own ppl",
                         "WER", "voice sim.", "flags"], rows)
        if r.speaker_method:
            lines.append(f"\nVoice similarity: {r.speaker_method} (see `ttt_speech/eval/speaker.py` for its limits).")
        lines += [f"- {n}" for n in r.notes]
    return lines


def _conversations_md(results: list[ConversationResult]) -> list[str]:
    lines = ["", "## Long conversations", "", "![conversation](conversation.png)", ""]
    rows = [[r.name, r.dialogue, r.mode, " ".join(_f(x, ".2f") for x in r.user_loss),
             " ".join(_f(x, ".2f") for x in r.speaker_similarity) or "–", r.speaker_method or "–"] for r in results]
    lines += _table(["model", "dialogue", "user seat", "user-stream loss per minute", "voice similarity per minute",
                     "voice measure"], rows)
    lines += [f"- {r.name} / {r.dialogue}: {n}" for r in results for n in r.notes]
    return lines


def _clip(text: str | None, width: int = 60) -> str:
    """One table cell of free text: one line, no column breaks, at most `width` characters."""
    if text is None:
        return "–"
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[:width - 1] + "…"


def saved_run_md(name: str, minutes: list[MinuteAudio], speaker_method: str | None, notes: list[str]) -> str:
    """`score-free-run`'s table: per minute the WER of the model's words against the ASR transcript of its
    audio, the voice similarity to the first minute, and both texts (truncated; in full in the JSON)."""
    rows = [[str(a.minute + 1), _f(a.wer, ".2f"), _f(a.speaker_similarity, ".2f"), _clip(a.asr), _clip(a.model_text)]
            for a in minutes]
    lines = [f"# {name}: audio per minute", "",
             *_table(["minute", "WER", "voice sim.", "ASR text", "model text"], rows)]
    if speaker_method:
        lines.append(f"\nVoice similarity: {speaker_method} (see `ttt_speech/eval/speaker.py` for its limits).")
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


RULES = """## How to read this

- **Quality at length L** = exp(-mean loss over positions [L/2, L)) of the quality streams: the
  geometric-mean probability the model gives the true token at depth L, teacher-forced and
  streamed in production form (Moshi frame by frame through its ring KV cache and TTT states;
  HF in chunks through its sliding-window cache and TTT states).
- **Degradation rule**: the baseline is the quality at the baseline length B (positions [B/2, B));
  a model degrades at the first length whose quality is below the threshold x baseline.
- **Inside / beyond the window**: mean loss over positions [W/2, W) of the attention window W
  against all positions >= W. A model that remembers past its window keeps the gap near 0.
- **OOM** ends a model's pass: lengths it had reached keep their numbers, the rest read "oom".
- Peak memory is CUDA's peak allocation on GPU, the process RSS on CPU (a proxy).
"""


def write(report: Report, out_dir: str | Path) -> dict[str, Path]:
    """Write report.md, results.json and the PNGs; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    lines = ["# Long-context evaluation", "", "Settings (also in results.json):", "",
             *(f"- {k}: `{v}`" for k, v in report.settings.items() if v not in (None, False)), ""]
    lines += [f"- {n}" for n in report.notes] + [""] + RULES.splitlines()
    if report.long_context:
        for p in plots.loss_vs_position(report.long_context, out):
            files[p.stem] = p
        files["degradation"] = plots.degradation(report.long_context, out)
        if any(r.copy_loss for r in report.long_context):
            files["recall_vs_gap"] = plots.recall_vs_gap(report.long_context, out)
        lines += ["", *_long_context_md(report.long_context), "", "![degradation](degradation.png)"]
    if report.free_runs:
        files["free_run"] = plots.free_runs(report.free_runs, out)
        lines += _free_runs_md(report.free_runs, report.thresholds)
    if report.conversations:
        files["conversation"] = plots.conversations(report.conversations, out)
        lines += _conversations_md(report.conversations)
    files["report"] = out / "report.md"
    files["report"].write_text("\n".join(lines) + "\n")
    files["results"] = out / "results.json"
    files["results"].write_text(json.dumps(report.to_dict(), indent=1, default=str) + "\n")
    return files
