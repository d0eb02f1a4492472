"""Held-out quality of a codec: encode, decode, compare. Mel distance, SI-SNR, and ASR WER side by side.

Each channel of each held-out file (its first `seconds`) goes through Mimi's encode -> decode with
`k` codebooks for each `k` asked. With pocketsphinx installed the original and the reconstruction
are both transcribed: `wer_reconstructed_vs_original` is the reconstruction's WER against what the
recogniser heard in the original (how much the codec costs intelligibility, whatever the
recogniser's own errors), and where a transcript lies beside the wav (`.json` alignments as
`ttt-speech tokenize` reads them) both are also scored against it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from moshi.models.compression import MimiModel

from ttt_speech.audio import SAMPLE_RATE
from ttt_speech.codec.data import AudioExample, read_audio
from ttt_speech.codec.losses import ReconstructionLoss, si_snr
from ttt_speech.eval.asr import Recognizer, asr_available, word_error_rate
from ttt_speech.manifest import MAIN_SPEAKER

log = logging.getLogger(__name__)


@dataclass
class ClipScore:
    path: str
    channel: int
    seconds: float
    codebooks: int
    mel_distance: float  # multi-scale log-mel L1 (the training loss's mel_l1)
    si_snr: float  # dB
    asr_original: str | None = None
    asr_reconstructed: str | None = None
    wer_reconstructed_vs_original: float | None = None
    wer_original: float | None = None  # against the transcript beside the wav
    wer_reconstructed: float | None = None
    start: float = 0.0  # seconds into the file


def transcript_text(wav: Path, channel: int, channels: int, seconds: float, start: float = 0.0) -> str | None:
    """Words starting within [start, start + seconds) of a transcript beside `wav`: the main speaker's on the left
    channel of a stereo file, everyone else's on the right, all words for mono; None without a transcript."""
    path = wav.with_suffix(".json")
    if not path.exists():
        return None
    try:
        items = json.loads(path.read_text())["alignments"]
        words = [(str(w), float(s), spk) for w, (s, _), spk in items]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        log.warning("%s: not a transcript ({\"alignments\": [[word, [start, end], speaker], ...]}); ignored", path)
        return None
    keep = [w for w, s, spk in words
            if start <= s < start + seconds and (channels != 2 or (spk == MAIN_SPEAKER) == (channel == 0))]
    return " ".join(keep)


@torch.no_grad()
def reconstruct(mimi: MimiModel, audio: torch.Tensor, codebooks: int) -> torch.Tensor:
    """[T] audio -> [T] audio through `codebooks` codebooks (the model's own count restored after)."""
    before = mimi.num_codebooks
    mimi.set_num_codebooks(codebooks)
    try:
        x = audio.view(1, 1, -1).to(next(mimi.parameters()).device)
        return mimi.decode(mimi.encode(x))[0, 0, : audio.shape[-1]].float().cpu()
    finally:
        mimi.set_num_codebooks(before)


def evaluate_codec(mimi: MimiModel, examples: list[AudioExample], seconds: float = 20.0,
                   codebooks: list[int] | None = None, asr: bool = True, clips: int = 1) -> list[ClipScore]:
    """Scores per clip and codebook count (default: all codebooks); ASR only when asked and installed.

    `clips` clips of `seconds` per file and channel, evenly spaced from its start to its end; silent clips
    (a reading's empty user channel) are skipped: there is nothing to reconstruct or recognise.
    """
    mimi.eval()
    ks = codebooks or [mimi.total_codebooks]
    losses = ReconstructionLoss([64, 128, 256, 512, 1024, 2048], 64, SAMPLE_RATE)
    recognizer = None
    if asr:
        reason = asr_available()
        if reason:
            log.warning(reason)
        else:
            recognizer = Recognizer()
    scores = []
    for ex, start in ((ex, i * max(0.0, ex.duration - seconds) / max(1, clips - 1))
                      for ex in examples for i in range(clips)):
        n = round(min(seconds, ex.duration) * SAMPLE_RATE)
        audio = torch.from_numpy(read_audio(ex, start, n))
        if not audio.any():
            continue
        heard = recognizer.transcribe(audio.numpy(), SAMPLE_RATE) if recognizer else None
        reference = transcript_text(ex.path, ex.channel, ex.channels, n / SAMPLE_RATE, start) if recognizer else None
        for k in ks:
            out = reconstruct(mimi, audio, k)
            score = ClipScore(str(ex.path), ex.channel, n / SAMPLE_RATE, k,
                              float(losses(audio[None], out[None])["mel_l1"]), float(si_snr(audio[None], out[None])),
                              start=start)
            if recognizer is not None:
                score.asr_original = heard
                score.asr_reconstructed = recognizer.transcribe(out.numpy(), SAMPLE_RATE)
                score.wer_reconstructed_vs_original = word_error_rate(heard or "", score.asr_reconstructed)
                if reference:
                    score.wer_original = word_error_rate(reference, heard or "")
                    score.wer_reconstructed = word_error_rate(reference, score.asr_reconstructed)
            scores.append(score)
    return scores


def summarize(scores: list[ClipScore]) -> list[dict[str, float | int | None]]:
    """Means per codebook count (WERs over the clips that have one)."""
    rows = []
    for k in sorted({s.codebooks for s in scores}):
        mine = [s for s in scores if s.codebooks == k]
        row: dict[str, float | int | None] = {"codebooks": k, "clips": len(mine)}
        for key in ("mel_distance", "si_snr", "wer_original", "wer_reconstructed", "wer_reconstructed_vs_original"):
            values = [getattr(s, key) for s in mine if getattr(s, key) is not None]
            row[key] = sum(values) / len(values) if values else None
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, float | int | None]]) -> str:
    keys = list(rows[0])
    lines = [" | ".join(keys), " | ".join("---" for _ in keys)]
    for r in rows:
        lines.append(" | ".join("-" if r[k] is None else f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k])
                                for k in keys))
    return "\n".join(lines)


def write_report(scores: list[ClipScore], out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "codec_eval.json"
    path.write_text(json.dumps({"summary": summarize(scores), "clips": [asdict(s) for s in scores]}, indent=1) + "\n")
    return path
