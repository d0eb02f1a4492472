"""Issue 24, section 9: in-place recall against the state's age (frames streamed before the source), CPU.

    PYTHONPATH=src python recipes/evidence24/recall_age.py NAME=DIR[,NAME=DIR] CONTEXTS GAPS PER_SEQUENCE OUT.json [VAL]
Copy probes of eval-long (32-frame span, held-out speech) with its two controls, the source replaced and
the memory reset after the source; text words and codebook 0, bootstrap 95 % intervals.
"""
import json, sys
import torch
from safetensors.torch import load_file
from ttt_speech.eval.data import Sequence
from ttt_speech.eval.models import load_model, MoshiScorer
from ttt_speech.eval.spans import copy_probes
from ttt_speech.eval.long_context import evaluate_copies
torch.set_num_threads(2)
tok = load_file(sys.argv[6] if len(sys.argv) > 6 else "runs/evidence/tok/val/tokens_00000.safetensors")
seqs = [Sequence(f"s{k}", v.long()) for k, v in sorted(tok.items(), key=lambda kv: int(kv[0]))]
contexts = [int(c) for c in sys.argv[2].split(",")]
gaps = [int(g) for g in sys.argv[3].split(",")]
per = int(sys.argv[4])
rows = []
for spec in sys.argv[1].split(","):
    name = spec.split("=")[0]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scorer = MoshiScorer(load_model(spec, device=device).scorer.model, name, segment=2048)
    for gap in gaps:
        for context in contexts:
            n = min(per, min(s.length for s in seqs) // (context + gap + 32))
            probes, spans = copy_probes(seqs, [gap], 32, context, n)
            rep = copy_probes(seqs, [gap], 32, context, n, replace_source=True)
            e = evaluate_copies(scorer, probes, spans, replaced=rep, reset=True, progress=False, boot=1000,
                                batch_size=12)[gap]
            row = {"model": name, "gap": gap, "context": context, "probes": e["probes"],
                   "copy/replaced": e["again/replaced"], "copy/reset": e["again/reset"], "copy/first": e["ratio"],
                   "again": e["again"], "again (replaced)": e["again (replaced)"], "again (reset)": e["again (reset)"],
                   "first": e["first"]}
            rows.append(row)
            t = row["copy/replaced"]["text words"]
            print(f"{name} gap {gap} context {context} n={e['probes']}: text copy/replaced {t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}]"
                  f" reset {row['copy/reset']['text words'][0]:.3f} first {row['copy/first']['text words'][0]:.3f}"
                  f" cb0 {row['copy/replaced']['codebook 0'][0]:.3f}; loss with memory {e['again']['text words']:.2f},"
                  f" reset {e['again (reset)']['text words']:.2f}", flush=True)
            json.dump(rows, open(sys.argv[5], "w"), indent=1)
