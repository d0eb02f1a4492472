"""Issue 24, section 19: free runs while a user talks, with the in-place memory writing as trained, frozen after the
prompt, or writing only the frames where the user's voice is heard (the server's `--listen-db` gate), text only.

The user is a held-out two-voice dialogue: its first PROMPT frames (both voices) prompt the model, then the model
speaks for itself while the dialogue's right channel (the user) goes on playing, looped to the run's length. The
gate reads the user's level from that channel's wav, frame by frame, with the server's own rule (`quiet_frames`).
Scored per minute as section 18 (pad ratio; minutes 2-9 below 0.15).
  python recipes/evidence24/duplex_free_runs.py MODEL_DIR DIALOGUE.wav TOKENS_DIR OUT [--seeds 0 1 2] [--minutes 10]
"""

from __future__ import annotations

import argparse
import json
import wave
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ttt_speech.eval.data import load_sequences
from ttt_speech.eval.free_run import free_run_moshi
from ttt_speech.eval.gibberish import FRAMES_PER_MINUTE, PAD_FLOOR, minutes_below_pad_floor
from ttt_speech.moshi import load_hybrid
from ttt_speech.serve.streams import quiet_frames

POLICIES = ("trained", "frozen", "listening")
LISTEN_DB = -50.0  # dBFS: flite's voices are ~-20, its pauses digital silence


def user_voice(wav_path: Path, frame: int = 1920) -> np.ndarray:
    """[frames] True where the right channel (the user) is louder than the server's default gate."""
    with wave.open(str(wav_path)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16).reshape(-1, w.getnchannels())[:, 1]
    n = len(pcm) // frame
    return quiet_frames(pcm[:n * frame].reshape(n, frame).astype(np.float32) / 32768.0, LISTEN_DB) == 0.0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", type=Path)
    p.add_argument("wav", type=Path)
    p.add_argument("tokens", type=Path, help="tokenized held-out split whose first sequence is the dialogue")
    p.add_argument("out", type=Path)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--prompt", type=int, default=250)
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    args = p.parse_args()
    torch.set_num_threads(1)
    lm = load_hybrid(args.model, dtype=torch.float32).eval()
    dialogue = load_sequences(args.tokens)[0].tokens
    voice = torch.from_numpy(user_voice(args.wav))
    T, P = dialogue.shape[-1], args.prompt
    frames = round(args.minutes * FRAMES_PER_MINUTE)
    loop = torch.arange(P + frames) % min(T, len(voice))  # the dialogue again from its start when it ends
    user = dialogue[1 + lm.dep_q:1 + lm.n_q][:, loop]
    listening = voice[loop]
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"user voice in {float(voice.float().mean()):.2f} of the dialogue's frames", flush=True)
    for policy in args.policies:
        for seed in args.seeds:
            run = free_run_moshi(lm, policy, frames, prompt=dialogue[:, :P], user=user, seed=seed, progress=False,
                                 writes_after_prompt=None if policy == "trained" else 0.0,
                                 listening=listening if policy == "listening" else None)
            pads = [m.pad_ratio for m in run.minutes]
            low = minutes_below_pad_floor(pads)
            record = {"policy": policy, "seed": seed, "pad_ratio": pads, "below_floor_2_9": low,
                      "minutes": [asdict(m) for m in run.minutes]}
            (args.out / f"{policy}_s{seed}.json").write_text(json.dumps(record, default=float))
            print(f"{policy} s{seed}: pad {' '.join(f'{x:.2f}' for x in pads)}; minutes 2-9 below {PAD_FLOOR}: {low}",
                  flush=True)


if __name__ == "__main__":
    main()
