"""Math of the TTT layers: plain-torch references, kernels and streaming steps."""
