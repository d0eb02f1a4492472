"""Issue 24, section 11: the shipped in-place memory writing less of what it hears, at inference.

    PYTHONPATH=src python recipes/evidence24/write_scale.py MODEL_DIR OUT_DIR SCALE
Copies a Moshi model directory with every in-place layer's `target_proj.weight` times SCALE: every value, hence
every write into the fast weights, is SCALE times the trained one (values = eta * W_target conv(s), linear in
W_target); nothing else changes. A free run that drifts because the memory reinforces the model's own samples
should drift less; the copy probes say how much recall that costs. No training.
"""
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file


def main(src: Path, out: Path, scale: float) -> None:
    shutil.copytree(src, out)
    weights = load_file(src / "model.safetensors")
    scaled = [k for k in weights if k.endswith(".memory.target_proj.weight")]
    if not scaled:
        raise SystemExit(f"{src}: no in-place memory (no '*.memory.target_proj.weight'): nothing to scale")
    for k in scaled:
        weights[k] = (weights[k].float() * scale).to(weights[k].dtype)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    print(f"{out}: {len(scaled)} layers' writes x {scale}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]))
