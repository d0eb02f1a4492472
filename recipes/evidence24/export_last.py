"""Export RUN_DIR's newest checkpoint (a run stopped by SIGTERM at a deadline writes one but no export).

    python export_last.py RUN_DIR
"""

import sys
from pathlib import Path

import torch

from ttt_speech.train.config import load_config
from ttt_speech.train.loop import export_checkpoint

run = Path(sys.argv[1])
cfg = load_config(run / "config.yaml")
last = sorted((run / "checkpoints").glob("step_*"))[-1]
export_checkpoint(cfg, last, run / "export", torch.float32)
print(f"{run}: exported {last.name}")
