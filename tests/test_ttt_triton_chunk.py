"""The Triton TTT-Linear training kernel equals the reference, forward and backward.

Outputs, final weights and the gradients of every input (q, k, v, both step sizes, the inner
LayerNorm, the initial weights) against autograd through `reference.ttt_chunked`. On CUDA at the
bf16 operand precision the layers use (tolerances as documented in docs/benchmarks.md) and at fp32;
without CUDA in Triton's CPU interpreter (fp32, tight).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")


def problem(B: int, H: int, T: int, D: int, device: str, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(device).requires_grad_()
    q, k, v = r(B, H, T, D, sc=D**-0.5), r(B, H, T, D, sc=D**-0.5), r(B, H, T, D)
    a = (torch.rand(B, H, T, generator=g) * 0.3).to(device).requires_grad_()
    c = (torch.rand(B, H, T, generator=g) + 0.5).to(device).requires_grad_()
    ln_w = (1 + 0.3 * torch.randn(H, D, generator=g)).to(device).requires_grad_()
    ln_b = r(H, D, sc=0.2)
    return q, k, v, a, c, ln_w, ln_b, r(B, H, D, D, sc=D**-0.5), r(B, H, 1, D, sc=0.3)


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.detach().float(), y.detach().float()
    return float((x - y).norm() / y.norm().clamp_min(1e-12))


def compare(device: str, shape: tuple[int, int, int, int], mini_batch: int, precision: str,
            atol_out: float, rtol_w: float, rtol_grad: float, every: int = 16) -> None:
    from ttt_speech.ops.ttt.reference import ttt_chunked
    from ttt_speech.ops.ttt.triton_chunk import ttt_linear_chunked_triton

    B, H, T, D = shape
    for residual in ("q", "z"):
        inputs = problem(B, H, T, D, device, seed=len(residual) + T)
        q, k, v, a, c, ln_w, ln_b, W0, b0 = inputs
        zeros = [torch.zeros_like(W0), torch.zeros_like(b0)]
        offset = torch.zeros(B, dtype=torch.long, device=device)
        ref, (W_ref, b_ref), _, _ = ttt_chunked(q, k, v, a, c, ln_w, ln_b, [W0, b0], zeros, offset, mini_batch,
                                                residual=residual)
        low = precision == "bf16"
        qkv = [t.bfloat16() if low else t for t in (q, k, v)]
        out, W, b = ttt_linear_chunked_triton(*qkv, a, c, ln_w, ln_b, W0, b0, mini_batch, residual,
                                              precision=precision, checkpoint_every=every)
        g = torch.Generator().manual_seed(1)
        dout, dW, db = (torch.randn(x.shape, generator=g).to(device) for x in (ref, W_ref, b_ref))
        want = torch.autograd.grad((ref * dout).sum() + (W_ref * dW).sum() + (b_ref * db).sum(), inputs)
        got = torch.autograd.grad((out * dout).sum() + (W * dW).sum() + (b * db).sum(), inputs)
        where = f"{residual=} {shape=} {mini_batch=} {precision} {every=}"
        assert (out - ref).abs().max() <= atol_out * max(1.0, float(ref.detach().abs().max())), where
        assert rel(W, W_ref) <= rtol_w and rel(b, b_ref) <= rtol_w, where
        for name, x, y in zip(("q", "k", "v", "a", "c", "ln_w", "ln_b", "W0", "b0"), got, want):
            assert rel(x, y) <= rtol_grad, f"{where}: grad {name} rel {rel(x, y):.2e}"


def compare_layer() -> None:
    """Through `TTTLayer.forward` on CPU (interpreter): the kernel on two whole mini-batches, the
    reference on the tail, equal to the reference alone — outputs, state and every parameter's grad."""
    from ttt_speech import TTTConfig
    from ttt_speech.layers.ttt import use_triton

    for variant in ("ttt-lm", "fla"):
        torch.manual_seed(0)
        layer = TTTConfig(dim=32, num_heads=2, mini_batch=16, variant=variant, gate_init=0.5).build()
        with torch.no_grad():
            for n in ("ttt_norm_bias", "lr_bias", "b1"):
                getattr(layer, n).add_(torch.randn_like(getattr(layer, n)) * 0.3)
        x = torch.randn(2, 40, 32)
        assert layer._chunk_kernel(x, layer.init_state(2)) is not None
        names, params = zip(*layer.named_parameters())
        results = []
        for enabled in (True, False):
            with use_triton(enabled):
                y, state = layer(x)
            results.append((y, state, torch.autograd.grad(y.square().sum() + state["W1"].sum(), params)))
        (y1, s1, g1), (y2, s2, g2) = results
        torch.testing.assert_close(y1, y2, rtol=0, atol=1e-5)
        for k in s1:
            torch.testing.assert_close(s1[k], s2[k], rtol=0, atol=1e-5)
        for n, a, b in zip(names, g1, g2):
            assert rel(a, b) <= 1e-5, f"{variant} grad {n}: {rel(a, b):.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("precision,tols", [("ieee", (1e-4, 1e-4, 1e-4)), ("bf16", (2e-2, 1e-2, 5e-2))])
def test_kernel_equals_reference_cuda(precision, tols):
    compare("cuda", (2, 4, 1024, 128), 16, precision, *tols)  # 4 blocks of 16 mini-batches
    compare("cuda", (1, 2, 256 + 64, 64), 32, precision, *tols, every=3)  # blocks of 3, 3, 3, 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the tests above run the compiled kernel")
def test_kernel_equals_reference_interpreter():
    # Triton's interpreter is chosen when kernels are defined, so it needs a fresh process
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


if __name__ == "__main__":
    compare("cpu", (2, 2, 64, 16), 16, "ieee", 1e-5, 1e-5, 1e-5, every=3)  # blocks of 3 + 1 mini-batches
    compare("cpu", (1, 3, 64, 32), 32, "ieee", 1e-5, 1e-5, 1e-5, every=1)
    compare("cpu", (1, 2, 64, 16), 16, "ieee", 1e-5, 1e-5, 1e-5)  # one block
    compare_layer()
