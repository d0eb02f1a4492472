"""How far two fp32 computations of the same math may differ on the CPU.

oneDNN / MKL pick their kernels and blocking by the operands' shapes and memory alignment, so the same product in
another layout (a loaded copy of the weights, one row instead of a batch, a rerun in another batch) can differ in
its last bits: on an AMD EPYC with AVX-512 (2026-12-02) by up to 4e-6 on logits of size ~1, where the Intel CPUs
before had given bit-equal results. Tests that mean "the same computation" compare within this, far below any
real mistake (a wrong weight or a skipped step moves logits by 1e-2 and more).
"""

REASSOCIATION = {"rtol": 1e-5, "atol": 1e-5}  # torch.testing.assert_close keywords, fp32
