"""The fused Triton step equals the plain-torch step (on CUDA, or in Triton's CPU interpreter)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")


def compare(device: str) -> None:
    from ttt_speech.ops.ttt.step import ttt_step_
    from ttt_speech.ops.ttt.triton_step import ttt_linear_step_triton_

    torch.manual_seed(0)
    B, H, D, K = 3, 2, 32, 4
    g = lambda *s, sc=1.0: torch.randn(*s, device=device) * sc
    for residual in ("q", "z"):
        weights = [g(B, H, D, D, sc=0.1), g(B, H, 1, D, sc=0.1)]
        grads = [g(B, H, D, D, sc=0.01), g(B, H, 1, D, sc=0.01)]
        offset = torch.tensor([0, 2, 3], device=device)
        ln_w, ln_b = 1 + g(H, D, sc=0.1), g(H, D, sc=0.1)
        mine = ([w.clone() for w in weights], [x.clone() for x in grads], offset.clone())
        ref = ([w.clone() for w in weights], [x.clone() for x in grads], offset.clone())
        exec_mask = torch.tensor([True, False, True], device=device)
        for t in range(6):  # crosses mini-batch boundaries for every stream
            q, k, v = g(B, H, 1, D), g(B, H, 1, D), g(B, H, 1, D)
            a, c = torch.rand(B, H, 1, device=device), torch.rand(B, H, 1, device=device) * 0.5
            m = exec_mask if t % 2 else None
            y1 = ttt_linear_step_triton_(q, k, v, a, c, ln_w, ln_b, *mine, K, residual=residual, exec_mask=m)
            y2 = ttt_step_(q, k, v, a, c, ln_w, ln_b, *ref, K, residual=residual, exec_mask=m)
            torch.testing.assert_close(y1, y2, rtol=0, atol=2e-5)
        for x, y in zip(mine[0] + mine[1], ref[0] + ref[1]):
            torch.testing.assert_close(x, y, rtol=0, atol=2e-5)
        assert torch.equal(mine[2], ref[2])


def test_fused_step_equals_torch_step():
    if torch.cuda.is_available():
        compare("cuda")
        return
    # Triton's interpreter is chosen when kernels are defined, so it needs a fresh process
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


if __name__ == "__main__":
    compare("cpu")
