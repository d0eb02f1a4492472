"""Stream a Moshi (vanilla or TTT hybrid) for minutes and record what it costs per frame.

Moshi produces 12.5 frames per second of audio. `stream` runs moshi's own `LMGen` one frame at a
time, as the server would, and records per-frame latency, streaming-state bytes (KV caches + TTT
states) and process RSS, so a plot shows whether memory stays flat and latency stays put over a
long session. `write_outputs` saves the tokens, the decoded audio (with a Mimi) and that plot.
"""

from __future__ import annotations

import json
import time
import typing as tp
import wave
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from moshi.models.compression import MimiModel
from moshi.models.lm import LMGen, LMModel
from moshi.modules.streaming import StreamingModule
from moshi.modules.transformer import RingKVCache
from torch import Tensor
from tqdm import tqdm

from ttt_speech.audio import FRAME_RATE, SAMPLE_RATE
from ttt_speech.layers.state import LayerState
from ttt_speech.moshi.compat import force_text_token, kv_caches_follow_autocast



def streaming_tensors(*modules: StreamingModule) -> list[Tensor]:
    """Tensors held by the streaming states of `modules` and their streaming children (KV caches, TTT
    states), each once. Pass both an `LMGen` and its `lm_model`: LMGen detaches the model from its tree."""
    found: dict[int, Tensor] = {}
    for state in (s for m in modules for s in m.get_streaming_state().values()):
        for value in vars(state).values():
            if isinstance(value, Tensor):
                tensors = [value]
            elif isinstance(value, RingKVCache):
                tensors = [value.cache, value.end_offset]
            elif isinstance(value, LayerState):
                tensors = list(value.tensors.values())
            else:
                continue
            found.update((id(t), t) for t in tensors)
    return list(found.values())


def streaming_state_bytes(*modules: StreamingModule) -> int:
    return sum(t.numel() * t.element_size() for t in streaming_tensors(*modules))


def streaming_state_finite(*modules: StreamingModule) -> bool:
    """No NaN/Inf anywhere in the streaming state (a diverging TTT memory shows up here first)."""
    return all(bool(torch.isfinite(t).all()) for t in streaming_tensors(*modules) if t.is_floating_point())


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 where unavailable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    import resource

    return pages * resource.getpagesize()


@dataclass
class StreamResult:
    """Outputs and per-frame measurements of one `stream` run."""

    tokens: np.ndarray  # [B, 1 + dep_q, frames - max(delays)]: text token, then the audio codebooks
    frame_ms: np.ndarray  # [frames] wall time of each frame (LM step + Mimi decode)
    state_bytes: np.ndarray  # [frames] streaming-state bytes after each frame
    rss_bytes: np.ndarray  # [frames]
    wall_s: float
    state_finite: bool  # no NaN/Inf in KV caches and TTT states at the end

    @property
    def frames(self) -> int:
        """LMGen steps; the first max(delays) steps emit no tokens yet."""
        return len(self.frame_ms)

    def stats(self) -> dict[str, float]:
        ms = self.frame_ms
        return {
            "frames": float(self.frames), "audio_s": self.frames / FRAME_RATE, "wall_s": self.wall_s,
            "frames_per_s": self.frames / self.wall_s, "rtf": self.wall_s / (self.frames / FRAME_RATE),
            "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "max_ms": float(ms.max()), "state_bytes_first": float(self.state_bytes[0]),
            "state_bytes_last": float(self.state_bytes[-1]), "rss_bytes_max": float(self.rss_bytes.max()),
            "state_finite": self.state_finite,
        }


def silence_codes(mimi: MimiModel, n: int) -> Tensor:
    """The codes Mimi gives 1 s of silence (its last frame): what a quiet user sends."""
    device = next(mimi.parameters()).device
    with torch.no_grad():
        codes = mimi.encode(torch.zeros(1, mimi.channels, SAMPLE_RATE, device=device))
    return codes[0, :n, -1]


@torch.no_grad()
def generate_frames(lm: LMModel, user: Tensor, frames: int, *, prompt: Tensor | None = None, temp: float = 0.8,
                    temp_text: float = 0.7, flush: bool = True,
                    on_frame: tp.Callable[[int, Tensor, Tensor], None] | None = None) -> Tensor:
    """The model's own stream for B sequences at once: `frames` frames of text and its dep_q audio codebooks,
    undelayed [B, 1 + dep_q, frames], sampled by moshi's `LMGen` one frame per step as it serves.

    The first P frames of `prompt` [B, 1 + dep_q, P] are forced into the stream: the audio through LMGen's
    `depformer_replace_tokens` (in its delayed coordinates), the text by overwriting the token LMGen just
    wrote (`compat.force_text_token`). LMGen forces a whole depformer step or none, so the step after the
    prompt samples the new frame's first codebook together with the prompt's last frames' delayed codebooks:
    those few tokens are the model's samples, as the stream held them. `user` [B, n_user, >= steps] is the
    user's stream, one column per step. LMGen returns frame i at step i + max(delays): with `flush` it runs
    max(delays) more steps (user columns), so every frame is complete; without, the last max(delays) frames
    hold their text and audio codes 0 (free runs keep those steps' cost off). The RNG is the caller's
    (`torch.manual_seed`). `on_frame(i, text_logits [B, V], text_token [B])` sees each step's text logits and
    sampled token (before a prompt frame's text is forced in)."""
    P = 0 if prompt is None else prompt.shape[-1]
    B, device = user.shape[0], lm.device
    if P > frames:
        raise ValueError(f"the prompt has {P} frames, more than the {frames} to generate")
    step: list[Tensor] = []  # this step's text logits, then its token

    def on_logits(logits: Tensor) -> None:
        step[:] = [logits[:, 0, 0]]

    gen = LMGen(lm, use_sampling=True, temp=temp, temp_text=temp_text, on_text_logits_hook=on_logits,
                on_text_hook=step.append)
    steps = frames + (gen.max_delay if flush else 0)
    if user.shape[-1] < steps:
        raise ValueError(f"the user stream has {user.shape[-1]} frames, the run needs {steps}")
    codes = torch.zeros(B, 1 + lm.dep_q, frames, dtype=torch.long, device=device)
    delays = torch.tensor(lm.delays[1:1 + lm.dep_q], device=device)
    if prompt is not None:
        prompt = prompt.to(device)
    with kv_caches_follow_autocast(lm), gen.streaming(B):
        for i in range(steps):
            forced = None
            if i < P:  # the prompt's audio, in the depformer's delayed coordinates
                assert prompt is not None
                src = (i - delays).clamp(min=0)[None, :, None].expand(B, -1, -1)
                forced = prompt[:, 1:1 + lm.dep_q].gather(2, src)
            out = gen.step(user[:, :, i:i + 1].to(device), depformer_replace_tokens=forced)
            logits, token = step
            if on_frame is not None:
                on_frame(i, logits, token)
            if i < P:  # force the prompt's text where LMGen wrote its sample
                assert prompt is not None
                force_text_token(gen, prompt[:, 0, i])
                codes[:, 0, i] = prompt[:, 0, i]
            elif i < frames:
                codes[:, 0, i] = token
            if out is not None and i - gen.max_delay < frames:
                codes[:, 1:, i - gen.max_delay] = out[:, 1:1 + lm.dep_q, 0]
    return codes


@torch.no_grad()
def stream(
    lm: LMModel, frames: int, *, batch_size: int = 1, mimi: MimiModel | None = None,
    use_sampling: bool = True, temp: float = 0.8, temp_text: float = 0.7, seed: int = 0,
    progress: bool = True, audio_sink: tp.Callable[[np.ndarray], None] | None = None,
) -> StreamResult:
    """Run `LMGen` for `frames` steps with a silent user (Mimi's silence codes, or Moshi's "no input"
    token without a Mimi). With `mimi`, each frame's audio is decoded as it is made and handed to
    `audio_sink` ([B, 1920] float32 at 24 kHz), so nothing grows with the stream's length."""
    torch.manual_seed(seed)
    device = lm.device
    n_user = lm.n_q - lm.dep_q
    if mimi is not None:
        if mimi.cardinality != lm.card:
            raise ValueError(f"Mimi has {mimi.cardinality} bins per codebook, the LM {lm.card}")
        mimi.set_num_codebooks(max(lm.dep_q, n_user))
        user = silence_codes(mimi, n_user).to(device)
    else:
        user = torch.full((n_user,), lm.zero_token_id, dtype=torch.long, device=device)
    user = user.view(1, n_user, 1).expand(batch_size, -1, -1).contiguous()
    gen = LMGen(lm, use_sampling=use_sampling, temp=temp, temp_text=temp_text)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tokens = torch.zeros(batch_size, 1 + lm.dep_q, frames, dtype=torch.long)  # preallocated: flat RSS
    n_tokens = 0
    frame_ms, state_b, rss = np.zeros(frames), np.zeros(frames, np.int64), np.zeros(frames, np.int64)
    bar = tqdm(total=frames, unit="frame", disable=not progress, dynamic_ncols=True)
    with gen.streaming(batch_size), (mimi.streaming(batch_size) if mimi is not None else nullcontext()):
        sync()
        start = time.perf_counter()
        for i in range(frames):
            t0 = time.perf_counter()
            out = gen.step(user)
            if out is not None:
                tokens[:, :, n_tokens] = out[:, :, 0].cpu()
                n_tokens += 1
                if mimi is not None:
                    pcm = mimi.decode(out[:, 1:1 + lm.dep_q])[:, 0]
                    if audio_sink is not None:
                        audio_sink(pcm.float().cpu().numpy())
            sync()
            t1 = time.perf_counter()
            frame_ms[i] = (t1 - t0) * 1e3
            state_b[i] = streaming_state_bytes(gen, lm)
            rss[i] = rss_bytes()
            if i % 25 == 24 or i == frames - 1:
                elapsed = t1 - start
                bar.set_postfix(fps=f"{(i + 1) / elapsed:.1f}", rtf=f"{elapsed / ((i + 1) / FRAME_RATE):.3f}",
                                refresh=False)
                bar.update(i + 1 - bar.n)
        wall = time.perf_counter() - start
        finite = streaming_state_finite(gen, lm)
    bar.close()
    return StreamResult(tokens[:, :, :n_tokens].numpy(), frame_ms, state_b, rss, wall, finite)


class WavSink:
    """Appends each stream of a batch to its own mono 16-bit wav as frames arrive."""

    def __init__(self, paths: list[Path], sample_rate: int = SAMPLE_RATE) -> None:
        self.paths = paths
        self.files = []
        for path in paths:
            f = wave.open(str(path), "wb")
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(sample_rate)
            self.files.append(f)

    def __call__(self, pcm: np.ndarray) -> None:
        for f, x in zip(self.files, pcm):
            f.writeframes((np.clip(x, -1.0, 1.0) * 32767.0).astype("<i2").tobytes())

    def close(self) -> None:
        for f in self.files:
            f.close()


def plot(result: StreamResult, path: Path, title: str = "") -> None:
    """Per-frame latency (top), streaming state (middle) and process memory (bottom) against stream time, as
    a PNG. State and RSS get a panel each: on one twin axis both flat lines drew at the same height."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.arange(len(result.frame_ms)) / FRAME_RATE / 60.0
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True, height_ratios=(2, 1, 1))
    ax1.plot(t, result.frame_ms, lw=0.4, alpha=0.5, label="per frame")
    win = max(1, min(125, len(t) // 10))
    if len(t) >= win:
        med = np.array([np.median(result.frame_ms[max(0, i - win + 1):i + 1]) for i in range(len(t))])
        ax1.plot(t, med, lw=1.2, label=f"running median ({win} frames)")
    ax1.axhline(1e3 / FRAME_RATE, color="r", ls="--", lw=0.8, label="real time (80 ms)")
    ax1.set_ylabel("latency per frame (ms)")
    ax1.set_yscale("log")
    ax1.legend(loc="upper right", fontsize=8)
    for ax, values, unit, color, name, label in (
            (ax2, result.state_bytes / 2**10, "KiB", "C2", "state", "streaming state (KV caches + TTT states)"),
            (ax3, result.rss_bytes / 2**20, "MiB", "C3", "RSS", "process resident memory (RSS)")):
        ax.plot(t, values, color=color, lw=1.2, label=f"{label}: {values[0]:,.1f} -> {values[-1]:,.1f} {unit}")
        ax.set_ylabel(f"{name} ({unit})")
        ax.set_ylim(0, max(1.0, values.max() * 1.25))
        ax.legend(loc="lower right", fontsize=8)
    ax3.set_xlabel("stream time (min of audio)")
    fig.suptitle(title or "Moshi streaming: latency and memory per frame")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def wav_paths(out_dir: Path, batch_size: int) -> list[Path]:
    return [out_dir / "audio.wav"] if batch_size == 1 else [out_dir / f"audio_{b}.wav" for b in range(batch_size)]


def write_outputs(result: StreamResult, out_dir: str | Path, title: str = "",
                  extra: dict[str, tp.Any] | None = None) -> dict[str, Path]:
    """tokens.npy, latency_memory.png and stats.json (the wavs are written while streaming; `extra`: more
    entries for stats.json)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"tokens": out / "tokens.npy", "plot": out / "latency_memory.png", "stats": out / "stats.json"}
    np.save(files["tokens"], result.tokens)
    plot(result, files["plot"], title)
    files["stats"].write_text(json.dumps(result.stats() | (extra or {}), indent=2) + "\n")
    return files
