"""Issue 24, section 21: an in-place model on two-voice dialogues, its memory as trained vs lambda ~0 (every delta
faded at each chunk end, so the memory holds its last chunk only): the quote probes with both controls, and the text
loss per position. Why: a memory trained with a silent user meets a user who speaks. First, how alike the codes
of the user's sentence and of the model's quote of it are (codebook 0, the best of +-12 frames of offset, against
an unrelated span of the model's): a model can only copy codes that agree, else it must recognise the words.

    PYTHONPATH=src python recipes/evidence24/dialogue_memory.py MODEL_DIR TOKENS CORPORA [LENGTH [SILENCE [DB]]]
TOKENS: the dialogues tokenized with the user's codebooks (quote_corpus.sh's W/tok/train or val); CORPORA: the
make-corpus directories above them (W/c); LENGTH: the longest position scored (default 4096). Teacher-forced in
2048-frame segments (equal to eval-long's frame-by-frame numbers on the shipped model, 2026-12-03). SILENCE:
tok24.py's silence.safetensors: the loss by position once more with the user's rows replaced by silence's codes
(is it the user's voice that breaks the memory, or the model's own turns?). DB: the loss by position once more,
streamed frame by frame with the writes gated as `serve --listen-db DB` gates them (a frame is written only where
the user's channel of the dialogue's wav is louder than DB dBFS).
QUOTES=0 in the environment leaves out the codes' agreement and the quote probes (the loss by position alone).
"""
import os
import sys
from pathlib import Path

import torch

from ttt_speech.eval.data import Sequence, load_sequences
from ttt_speech.eval.long_context import evaluate, evaluate_quotes
from ttt_speech.eval.models import load_model
from ttt_speech.eval.spans import quote_probes, quote_spans, quotes_in

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # ~12 CPU minutes for two 8-minute dialogues


def agreement(a: torch.Tensor, b: torch.Tensor, at: int, reach: int = 12) -> float:
    """The largest share of equal codes between `a` and `b[at + k:]` over offsets k in [-reach, reach]."""
    best = 0.0
    for k in range(-reach, reach + 1):
        part = b[max(at + k, 0):at + k + len(a)]
        n = min(len(part), len(a))
        if n > 5:
            best = max(best, (part[:n] == a[:n]).float().mean().item())
    return best


def _r(x: list[float]) -> str:
    return f"{x[0]:.3f} [{x[1]:.3f}, {x[2]:.3f}]"


def gated_losses(model: str, seqs: list[Sequence], corpora: str, length: int, db: float) -> dict[int, float]:
    """Text loss by position bucket, streamed with the in-place writes muted where the user is not heard."""
    import wave

    import numpy as np

    from ttt_speech.moshi.layer import mute_writes_
    from ttt_speech.serve.streams import quiet_frames

    scorer = load_model(model, DEVICE, torch.float32, 0, 256, None).scorer
    lm, step = scorer.model, [0]
    forward_text, mutes = lm.forward_text, [torch.zeros(1)]

    def gated(*args):  # the scorer's one call per frame: set that frame's mute first, as the server does
        mute_writes_(lm, mutes[0][:, min(step[0], mutes[0].shape[1] - 1)])
        step[0] += 1
        return forward_text(*args)

    lm.forward_text = gated
    total: dict[int, list[float]] = {}
    for seq in seqs:
        with wave.open(str(Path(corpora) / seq.source)) as w:
            right = np.frombuffer(w.readframes(w.getnframes()), np.int16).reshape(-1, 2)[:, 1] / 32768.0
        frame = len(right) // seq.length
        quiet = quiet_frames(right[:frame * seq.length].reshape(seq.length, frame), db)
        mutes[0], step[0] = torch.from_numpy(quiet)[None].to(DEVICE), 0
        r = evaluate(scorer, [seq], [64, length], progress=False)
        for e, x, n in zip(r.bucket_edges, r.bucket_loss["text"], r.bucket_count["text"]):
            if x is not None:
                total.setdefault(e, [0.0, 0])
                total[e][0] += x * n
                total[e][1] += n
        print(f"  {seq.name}: the user heard in {1 - quiet.mean():.0%} of the frames", flush=True)
    return {e: round(a / n, 2) for e, (a, n) in sorted(total.items()) if e >= 64}


def main(model: str, tokens: str, corpora: str, length: str = "4096", silence: str | None = None,
         db: str | None = None) -> None:
    seqs, spans = load_sequences(tokens), quote_spans(corpora)
    with_quotes = os.environ.get("QUOTES", "1") != "0"
    g = torch.Generator().manual_seed(0)
    same, other = [], []
    for i, said, quoted in quotes_in(seqs, spans) if with_quotes else []:
        seq = seqs[i]
        user = seq.tokens[9, said.start:said.end]  # the user's codebook 0 (rows: text, the model's 8, the user's 8)
        same.append(agreement(user, seq.tokens[1], quoted.start))
        far = int(torch.randint(0, seq.length - len(user), (1,), generator=g))
        other.append(agreement(user, seq.tokens[1], far))
    if with_quotes:
        print(f"codebook 0, user's sentence vs the model's quote of it: {sum(same) / len(same):.3f} equal, vs an "
              f"unrelated span of the model's {sum(other) / len(other):.3f} ({len(same)} quotes)")
    for lambda0 in (False, True):
        scorer = load_model(model, DEVICE, torch.float32, 0, 256, 2048).scorer
        dep = scorer.model.dep_q
        user = slice(1 + dep, 1 + 2 * dep)
        if lambda0:
            with torch.no_grad():
                for name, p in scorer.model.named_parameters():
                    if name.endswith("decay_logit"):
                        p.fill_(-30.0)  # sigmoid: lambda ~ 1e-13
        label = "lambda~0" if lambda0 else "as trained"
        quotes = evaluate_quotes(scorer, *quote_probes(seqs, spans, 64, user),
                                 replaced=quote_probes(seqs, spans, 64, user, replace_source=True), reset=True,
                                 progress=False) if with_quotes else {}
        for gap, d in quotes.items():
            print(f"{label}, quotes {gap}-{2 * gap - 1} frames back ({d['probes']}): text words {d['again']['text words']:.3f}"
                  f" nats, / user replaced {_r(d['again/replaced']['text words'])}, / memory reset "
                  f"{_r(d['again/reset']['text words'])}")
        variants = [(label, seqs)]
        if silence and not lambda0:
            from safetensors.torch import load_file
            quiet = load_file(silence)["silence"].long()
            silent = [Sequence(q.name, torch.cat([q.tokens[:user.start], quiet[:, :q.length]]), q.source) for q in seqs]
            variants.append((f"{label}, the user's rows silence", silent))
        for name, data in variants:
            r = evaluate(scorer, data, [64, int(length)], progress=False)
            print(f"{name}, text loss by position:", {e: round(x, 2) for e, x in zip(r.bucket_edges, r.bucket_loss["text"])
                                                      if x is not None and e >= 64}, flush=True)


    if db is not None:
        print(f"writes gated at {db} dBFS, text loss by position:", gated_losses(model, seqs, corpora, int(length),
                                                                                 float(db)), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
