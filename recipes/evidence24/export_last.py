"""Export RUN_DIR's newest checkpoint (a run stopped by SIGTERM at a deadline writes one but no export), or the
one of STEP into RUN_DIR/export_STEP (a pre-registered step kept beside the last: arms.sh KEEPSTEPS).

    python export_last.py RUN_DIR [STEP]
"""

import sys
from pathlib import Path

import torch

from ttt_speech.engine.checkpoint import PREFIX, checkpoint_dir, latest_checkpoint
from ttt_speech.train.config import load_config
from ttt_speech.train.loop import export_checkpoint

run = Path(sys.argv[1])
cfg = load_config(run / "config.yaml")
if len(sys.argv) > 2:
    step = int(sys.argv[2])
    found = sorted(checkpoint_dir(run).glob(f"{PREFIX}*"))
    ckpt = next((p for p in found if int(p.name[len(PREFIX):]) == step), None)
    if ckpt is None:
        raise SystemExit(f"{run}: no checkpoint of step {step} (have {[p.name for p in found]}); "
                         "train with CKEEP large enough to keep it")
    out = run / f"export_{step}"
else:
    ckpt, out = latest_checkpoint(run), run / "export"
    if ckpt is None:
        raise SystemExit(f"{run}: no complete checkpoint")
export_checkpoint(cfg, ckpt, out, torch.float32)
print(f"{run}: exported {ckpt.name} to {out.name}")
