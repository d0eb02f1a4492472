import os

# moshi compiles lazily unless told not to (4-18 s per first forward on CPU); never reach a hub.
os.environ.setdefault("NO_TORCH_COMPILE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
