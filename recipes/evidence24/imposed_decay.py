"""Issue 24, section 9: an in-place export trained WITHOUT decay, read with a decay imposed at inference.

    PYTHONPATH=src python recipes/evidence24/imposed_decay.py EXPORT_DIR LAMBDAS [VAL]
Per lambda: copy / source replaced at gap 640 after 64, 1024 and 4096 frames of context (`recall_age.recall_row`:
eval's copy probes and controls, 36 probes), then the text loss per position bucket to 8192 frames
(teacher-forced, 2048-frame segments; equal to eval-long's frame-by-frame streaming at lambda 1: 2.00 / 1.95 /
3.13 / 8.04 both ways). No training: does bounding the state alone stop the breakdown past the training length?
"""
import dataclasses
import math
import sys

import torch
from recall_age import VAL, describe, recall_row
from torch import nn

from ttt_speech.eval.data import load_sequences
from ttt_speech.eval.long_context import evaluate
from ttt_speech.eval.models import MoshiScorer, load_model
from ttt_speech.layers.inplace import InPlaceLayer


def impose(lm: nn.Module, lam: float) -> None:
    """Every in-place layer of `lm` fades its delta by `lam` per chunk end, as if trained with `decay=lam`."""
    for layer in lm.modules():
        if isinstance(layer, InPlaceLayer):
            layer.config = dataclasses.replace(layer.config, decay=lam)
            if lam < 1:
                layer.decay_logit = nn.Parameter(torch.tensor(math.log(lam / (1 - lam))))


def main(argv: list[str]) -> None:
    torch.set_num_threads(2)
    seqs = load_sequences(argv[2] if len(argv) > 2 else VAL)
    lm = load_model(argv[0]).scorer.model
    for lam in [float(x) for x in argv[1].split(",")]:
        impose(lm, lam)
        scorer = MoshiScorer(lm, f"lambda {lam}", segment=2048)
        for context in (64, 1024, 4096):
            print(describe(recall_row(scorer, seqs, 640, context, 3, boot=500)), flush=True)
        r = evaluate(scorer, seqs, [1024, 2048, 4096, 8192], baseline_length=512, batch_size=12, progress=False)
        print(f"lambda {lam} text loss per bucket: " + " ".join(
            f"[{a},{b}) {v:.2f}" for a, b, v in zip(r.bucket_edges, r.bucket_edges[1:], r.bucket_loss["text"])
            if b > 256), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
