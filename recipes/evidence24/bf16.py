"""Cast a checkpoint directory's model.safetensors to bf16 (to carry it), keeping the other files."""
import shutil, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
src, dst = map(Path, sys.argv[1:3])
shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors", "mimi.safetensors"), dirs_exist_ok=True)
save_file({k: v.to(torch.bfloat16) for k, v in load_file(src / "model.safetensors").items()}, dst / "model.safetensors")
