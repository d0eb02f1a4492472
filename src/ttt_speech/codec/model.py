"""moshi's MimiModel built from a `MimiSize`, its training forward, and the export in the released format.

moshi ships Mimi without training code. What its classes already do is used as is: the split RVQ's
EMA codebooks with k-means initialisation, dead-code replacement and the commitment loss
(moshi.quantization.core_vq), and "no quantization" for a random share of sequences. Two pieces of
its training state live in Python attributes, outside the state dict, so they are driven from the
step number here to keep resumed runs identical: the number of active codebooks (quantizer dropout)
and the countdown to the next dead-code check.
"""

from __future__ import annotations

import json
import typing as tp
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from moshi.models.compression import MimiModel
from moshi.models.loaders import get_mimi
from moshi.quantization.core_vq import EuclideanCodebook
from safetensors.torch import save_file
from torch import Tensor

from ttt_speech.codec.config import MimiSize, QuantizerTraining
from ttt_speech.compat import fold_weight_norm
from ttt_speech.errors import UsageError, check_safetensors, existing_dir, read_json_object
from ttt_speech.moshi.compat import encode_latent, schedule_dead_code_check, to_encoder_framerate
from ttt_speech.moshi.files import MIMI_CONFIG_NAME, MIMI_WEIGHTS_NAME


def build_codec(size: MimiSize, seed: int, device: torch.device | str = "cpu") -> MimiModel:
    """A randomly initialised Mimi for training (weight-normed SEANet convs when `size.weight_norm`)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # moshi's SEANet uses the older torch.nn.utils.weight_norm
        warnings.simplefilter("ignore", FutureWarning)
        mimi = get_mimi(None, size.mimi_config(size.weight_norm), device=device, num_codebooks=size.codebooks)
    return mimi.train()


def codebooks(mimi: MimiModel) -> list[EuclideanCodebook]:
    return [m for m in mimi.quantizer.modules() if isinstance(m, EuclideanCodebook)]


def set_quantizer_step(mimi: MimiModel, q: QuantizerTraining, seed: int, step: int) -> int:
    """Active codebooks and dead-code check for training step `step` (a function of seed and step only)."""
    total = mimi.total_codebooks
    rng = np.random.default_rng([seed, step, 0xC0DE])
    n = int(rng.integers(1, total + 1)) if rng.random() < q.dropout else total
    mimi.set_num_codebooks(n)
    for rvq in (mimi.quantizer.rvq_first, mimi.quantizer.rvq_rest):
        rvq.no_quantization_rate = q.no_quantization_rate
    check = (step + 1) % q.replace_every == 0
    for cb in codebooks(mimi):
        schedule_dead_code_check(cb, 1 if check else 2)  # counts down once per forward: 1 -> check now
    return n


@dataclass
class CodecOutput:
    audio: Tensor  # [B, 1, T] reconstruction
    commitment: Tensor  # scalar
    metrics: dict[str, Tensor]  # moshi's RVQ metrics (codebook entropy, share of codes replaced)


def codec_forward(mimi: MimiModel, x: Tensor, bf16: bool) -> CodecOutput:
    """MimiModel.forward with the quantizer in fp32: its EMA buffers cannot take bf16 updates.

    `x` is [B, 1, T] with T a multiple of the frame size (1920 samples).
    """
    device = x.device.type
    with torch.autocast(device, torch.bfloat16, enabled=bf16):
        emb = encode_latent(mimi, x)
    with torch.autocast(device, enabled=False):
        q = mimi.quantizer(emb.float(), mimi.frame_rate)
    with torch.autocast(device, torch.bfloat16, enabled=bf16):
        emb = to_encoder_framerate(mimi, q.x)
        if mimi.decoder_transformer is not None:
            (emb,) = mimi.decoder_transformer(emb)
        out = mimi.decoder(emb)
    return CodecOutput(out[..., : x.shape[-1]].float(), q.penalty, q.metrics)


def released_state_dict(mimi: MimiModel) -> dict[str, Tensor]:
    """The state dict with weight-normed convs folded into plain weights (the released `norm: none` layout)."""
    state = {k: v.detach() for k, v in mimi.state_dict().items()}
    for name, module in mimi.named_modules():
        if hasattr(module, "weight_g"):  # torch.nn.utils.weight_norm over dim 0, as moshi applies it
            prefix = f"{name}." if name else ""
            g, v = state.pop(prefix + "weight_g"), state.pop(prefix + "weight_v")
            state[prefix + "weight"] = fold_weight_norm(v, g)
    return state


def size_report(mimi: MimiModel) -> dict[str, float]:
    """Parameters and the exported state dict's size (codebook buffers included) in fp16."""
    state = released_state_dict(mimi)
    return {"params_m": sum(p.numel() for p in mimi.parameters()) / 1e6,
            "state_m": sum(v.numel() for v in state.values()) / 1e6,
            "fp16_mb": sum(v.numel() * 2 for v in state.values()) / 1e6}


def export_codec(mimi: MimiModel, size: MimiSize, out_dir: str | Path) -> Path:
    """Write `mimi.safetensors` + `mimi_config.json` as released (fp32, plain convs); checked to load back.

    These are the file names `ttt_speech.moshi.tiny.write_tiny_checkpoint` uses: a Moshi checkpoint
    directory whose config.json names them (`mimi_name`, `mimi_config_name`) tokenizes with this codec.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = size.mimi_config(weight_norm=False)
    state = {k: v.detach().float().cpu().contiguous() for k, v in released_state_dict(mimi).items()}
    save_file(state, str(out / MIMI_WEIGHTS_NAME))
    (out / MIMI_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    load_codec(out)  # strict load: a mismatch must fail here, not in `ttt-speech tokenize`
    return out


def export_dir(path: str | Path) -> Path:
    """An exported codec's directory: `path` itself, or the `export/` of a train-codec run directory."""
    root = Path(path)
    if not (root / MIMI_CONFIG_NAME).exists() and (root / "export" / MIMI_CONFIG_NAME).exists():
        return root / "export"
    return root


def check_codec_dir(path: str | Path) -> dict[str, tp.Any]:
    """The mimi_config.json of an exported codec directory, after checking its files (a UsageError naming them)."""
    root = export_dir(existing_dir(path, "codec directory"))
    for name in (MIMI_WEIGHTS_NAME, MIMI_CONFIG_NAME):
        if not (root / name).exists():
            raise UsageError(f"{root}: no {name} (expected an exported codec directory or a train-codec run)")
    check_safetensors(root / MIMI_WEIGHTS_NAME)
    config = read_json_object(root / MIMI_CONFIG_NAME, "Mimi config")
    if not isinstance(config.get("quantizer"), dict) or not isinstance(config["quantizer"].get("n_q"), int):
        raise UsageError(f"{root / MIMI_CONFIG_NAME}: no quantizer.n_q (not a Mimi config)")
    return config


def load_codec(path: str | Path, device: torch.device | str = "cpu") -> MimiModel:
    """An exported codec (a directory with mimi.safetensors + mimi_config.json, or a run directory holding
    `export/`) through moshi's `get_mimi`, all codebooks active, in eval mode."""
    config = check_codec_dir(path)
    root = export_dir(path)
    return get_mimi(str(root / MIMI_WEIGHTS_NAME), config, device=device, num_codebooks=config["quantizer"]["n_q"])
