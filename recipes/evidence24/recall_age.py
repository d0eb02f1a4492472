"""Issue 24, section 9: in-place recall against the state's age (frames streamed before the source).

    PYTHONPATH=src python recipes/evidence24/recall_age.py NAME=DIR[,NAME=DIR] CONTEXTS GAPS PER_SEQUENCE OUT.json [VAL]
Copy probes of eval-long (32-frame span, held-out speech VAL, default runs/evidence/tok/val) with its two
controls, the source replaced and the memory reset after the source; text words and codebook 0, bootstrap
95 % intervals. Scored in 2048-frame segments (`MoshiScorer(segment=)`), on CUDA when there is one.
"""
import json
import sys

import torch

from ttt_speech.eval.data import Sequence, load_sequences
from ttt_speech.eval.long_context import evaluate_copies
from ttt_speech.eval.models import MoshiScorer, load_model
from ttt_speech.eval.spans import copy_probes

VAL = "runs/evidence/tok/val"
SPAN = 32


def recall_row(scorer: MoshiScorer, seqs: list[Sequence], gap: int, context: int, per: int, boot: int) -> dict:
    """One (gap, context) point: the probes, both controls, and what section 9's tables read from them."""
    n = min(per, min(s.length for s in seqs) // (context + gap + SPAN))
    probes, spans = copy_probes(seqs, [gap], SPAN, context, n)
    replaced = copy_probes(seqs, [gap], SPAN, context, n, replace_source=True)
    e = evaluate_copies(scorer, probes, spans, replaced=replaced, reset=True, progress=False, boot=boot,
                        batch_size=12)[gap]
    return {"model": scorer.name, "gap": gap, "context": context, "probes": e["probes"],
            "copy/replaced": e["again/replaced"], "copy/reset": e["again/reset"], "copy/first": e["ratio"],
            "again": e["again"], "again (replaced)": e["again (replaced)"], "again (reset)": e["again (reset)"],
            "first": e["first"]}


def describe(row: dict) -> str:
    t = row["copy/replaced"]["text words"]
    return (f"{row['model']} gap {row['gap']} context {row['context']} n={row['probes']}: text copy/replaced "
            f"{t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}] reset {row['copy/reset']['text words'][0]:.3f} first "
            f"{row['copy/first']['text words'][0]:.3f} cb0 {row['copy/replaced']['codebook 0'][0]:.3f}; loss with "
            f"memory {row['again']['text words']:.2f}, reset {row['again (reset)']['text words']:.2f}")


def main(argv: list[str]) -> None:
    torch.set_num_threads(2)
    seqs = load_sequences(argv[5] if len(argv) > 5 else VAL)
    contexts, gaps = ([int(x) for x in a.split(",")] for a in argv[1:3])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for spec in argv[0].split(","):
        scorer = load_model(spec, device=device, segment=2048).scorer
        for gap in gaps:
            for context in contexts:
                rows.append(recall_row(scorer, seqs, gap, context, int(argv[3]), boot=1000))
                print(describe(rows[-1]), flush=True)
                json.dump(rows, open(argv[4], "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
