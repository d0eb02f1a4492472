"""Issue 24, section 9: an in-place export trained WITHOUT decay, read with a decay imposed at inference.

    PYTHONPATH=src python recipes/evidence24/imposed_decay.py EXPORT_DIR LAMBDAS [VAL]
Per lambda: copy / source replaced at gap 640 after 64, 1024 and 4096 frames of context (eval's copy probes and
controls, 36 probes), then the text loss per position bucket to 8192 frames (teacher-forced, 2048-frame
segments; equal to eval-long's frame-by-frame streaming at lambda 1: 2.00 / 1.95 / 3.13 / 8.04 both ways).
No training: does bounding the state alone stop the breakdown past the training length?
"""
import dataclasses, math, sys
import torch
from torch import nn
from safetensors.torch import load_file
from ttt_speech.eval.data import Sequence
from ttt_speech.eval.models import load_model, MoshiScorer
from ttt_speech.eval.spans import copy_probes
from ttt_speech.eval.long_context import evaluate, evaluate_copies
from ttt_speech.layers.inplace import InPlaceLayer
torch.set_num_threads(2)
tok = load_file(sys.argv[3] if len(sys.argv) > 3 else "runs/evidence/tok/val/tokens_00000.safetensors")
seqs = [Sequence(f"s{k}", v.long()) for k, v in sorted(tok.items(), key=lambda kv: int(kv[0]))]
lm = load_model(sys.argv[1]).scorer.model
layers = [m for m in lm.modules() if isinstance(m, InPlaceLayer)]
for lam in [float(x) for x in sys.argv[2].split(",")]:
    for l in layers:
        l.config = dataclasses.replace(l.config, decay=lam)
        if lam < 1:
            l.decay_logit = nn.Parameter(torch.tensor(math.log(lam / (1 - lam))))
    scorer = MoshiScorer(lm, "b", segment=2048)
    for context in (64, 1024, 4096):
        probes, spans = copy_probes(seqs, [640], 32, context, 3)
        rep = copy_probes(seqs, [640], 32, context, 3, replace_source=True)
        e = evaluate_copies(scorer, probes, spans, replaced=rep, reset=True, progress=False, boot=500, batch_size=12)[640]
        t = e["again/replaced"]["text words"]
        print(f"lambda {lam} context {context}: copy/replaced {t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}] loss with memory "
              f"{e['again']['text words']:.2f} reset {e['again (reset)']['text words']:.2f} first {e['first']['text words']:.2f}",
              flush=True)
    r = evaluate(scorer, seqs, [1024, 2048, 4096, 8192], baseline_length=512, batch_size=12, progress=False)
    print(f"lambda {lam} text loss per bucket: " + " ".join(
        f"[{a},{b}) {v:.2f}" for a, b, v in zip(r.bucket_edges, r.bucket_edges[1:], r.bucket_loss["text"]) if b > 256),
        flush=True)
