"""The fused Triton step equals the layer's plain-torch step (on CUDA, or in Triton's CPU interpreter).

Compared through `TTTLayer.step`, so the kernel's RoPE, step sizes, token weights, state update,
offset advance and gated mix into a host attention's heads are all held to the torch path.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

CONFIGS = {
    "ttt-lm": dict(),
    "fla": dict(variant="fla"),
    "no-rope": dict(use_rope=False),
    "mamba-block": dict(pre_conv=True, share_qk=True, output_gate=True),
    "shared ttt-lm": dict(shared_qkv=True),
    "shared fla": dict(shared_qkv=True, variant="fla"),
}


def compare(device: str, dtype: torch.dtype, atol: float) -> None:
    from ttt_speech import TTTConfig
    from ttt_speech.layers.ttt import use_triton

    B, C, K = 3, 64, 4
    for name, kw in CONFIGS.items():
        torch.manual_seed(0)
        layer = TTTConfig(dim=C, num_heads=2, mini_batch=K, gate_init=0.5, **kw).build().to(device, dtype)
        with torch.no_grad():  # nothing hides behind zeros/ones
            for n, p in layer.named_parameters():
                if n in ("ttt_norm_weight", "ttt_norm_bias", "token_idx", "lr_bias", "b1", "gate_alpha"):
                    p.add_(torch.randn_like(p) * 0.3)
        assert layer._fused_params(torch.zeros(1, device=device), layer.init_state(1, device)) is not None
        states = [layer.init_state(B, device) for _ in range(2)]
        exec_mask = torch.tensor([True, False, True], device=device)
        for t in range(9):  # crosses mini-batch boundaries; masked steps put streams at different offsets
            x = torch.randn(B, C, device=device).to(dtype)
            host = {"qkv": torch.randn(B, 3 * C, device=device).to(dtype),
                    "heads": torch.randn(B, C, device=device).to(dtype)} if kw.get("shared_qkv") else {}
            m = exec_mask if t % 2 else None
            ys = []
            for s, fused in zip(states, (True, False)):
                with use_triton(fused):
                    ys.append(layer.step(x, s, m, **host)[0])
            torch.testing.assert_close(ys[0], ys[1], rtol=0, atol=atol, msg=lambda e, w=f"{name}, token {t}": f"{w}: {e}")
        for k in states[0]:
            torch.testing.assert_close(states[0][k], states[1][k], rtol=0, atol=atol, msg=lambda e, w=f"{name} {k}": f"{w}: {e}")


@pytest.mark.gpu
def test_fused_step_equals_torch_step_cuda():
    compare("cuda", torch.float32, 2e-5)
    compare("cuda", torch.bfloat16, 2e-2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the test above runs the compiled kernel")
def test_fused_step_equals_torch_step_interpreter():
    # Triton's interpreter is chosen when kernels are defined, so it needs a fresh process
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


if __name__ == "__main__":
    compare("cpu", torch.float32, 2e-5)
