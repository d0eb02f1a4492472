"""Training forward of a Moshi TTT hybrid (or a plain Moshi, for baselines), one segment at a time.

moshi's `LMModel.forward` runs the temporal transformer over the whole sequence with a dense
[B, 1, T, T] attention mask; this runs the same modules (same weights, same order of operations)
with `windowed_attention` and the TTT state and attention window carried across segments. The
loss is moshi-finetune's: cross-entropy on the text stream and on the model's own audio
codebooks (the user's codebooks are inputs only), text padding weighted x0.5 and the first audio
codebook x100 by default, each of the two normalised by its own total weight.
"""

from __future__ import annotations

import json
import logging
import typing as tp
from pathlib import Path

import torch
from moshi.models.lm import LMModel
from moshi.models.loaders import MOSHI_NAME, CheckpointInfo
from moshi.modules.transformer import StreamingMultiheadAttention, create_sin_embedding, expand_repeated_kv
from torch import Tensor, nn

from ttt_speech.moshi import TTTLMModel, convert, default_branch_config, load_hybrid
from ttt_speech.moshi.checkpoint import save_moshi_checkpoint
from ttt_speech.moshi.compat import delay_sequence, feed_forward
from ttt_speech.moshi.config import infer_moshi_config
from ttt_speech.moshi.tiny import build_tiny_lm, tiny_lm_config
from ttt_speech.train.attention import windowed_attention
from ttt_speech.train.config import LossConfig, ModelConfig
from ttt_speech.train.model import Batch, LayerCarry, SegmentLM

log = logging.getLogger(__name__)


def moshi_checkpoint_info(path: str, mimi_config: str | None = None) -> CheckpointInfo:
    """CheckpointInfo of a local Moshi directory (config.json naming its files) or of a hub repo id."""
    root = Path(path)
    if not root.is_dir():
        return CheckpointInfo.from_hf_repo(path, mimi_config_path=mimi_config)
    config_path = root / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{root}: no config.json (a Moshi checkpoint directory names its files there)")
    raw = json.loads(config_path.read_text())
    mimi_cfg = mimi_config or (str(root / raw["mimi_config_name"]) if "mimi_config_name" in raw else None)
    return CheckpointInfo.from_hf_repo(
        str(root), moshi_weights=root / raw.get("moshi_name", MOSHI_NAME),
        mimi_weights=root / raw["mimi_name"] if "mimi_name" in raw else None,
        tokenizer=root / raw["tokenizer_name"] if "tokenizer_name" in raw else None,
        config_path=config_path, mimi_config_path=Path(mimi_cfg) if mimi_cfg else None)


def load_moshi(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> LMModel:
    """The model `cfg` names, converted to a TTT hybrid unless it is one already or `layers` is empty."""
    if cfg.hybrid:
        return load_hybrid(cfg.hybrid, device=device, dtype=dtype)
    if cfg.tiny:
        config = tiny_lm_config()
        lm = build_tiny_lm(cfg.seed, config, device=device, dtype=dtype)
    else:
        info = moshi_checkpoint_info(tp.cast(str, cfg.pretrained), cfg.mimi_config)
        lm, config = info.get_moshi(device=device, dtype=dtype), info.raw_config
    if cfg.layers == []:
        return lm
    torch.manual_seed(cfg.seed)  # the new TTT layers' initialisation
    ttt = default_branch_config(lm, tp.cast(tp.Any, cfg.mode), cfg.branch, **cfg.ttt)
    return convert(lm, cfg.layers, tp.cast(tp.Any, cfg.mode), ttt, moshi_config=config)


class MoshiSegmentLM(SegmentLM):
    """Moshi: inputs are [text, model audio codebooks, user audio codebooks] per 12.5 Hz frame."""

    model: LMModel

    def __init__(self, lm: LMModel, window: int | None, chunk: int | None, checkpointing: bool,
                 loss: LossConfig) -> None:
        if lm.condition_provider is not None or lm.fuser is not None:
            raise ValueError("conditioned Moshi models are not supported by the trainer yet")
        attns = [m for m in lm.transformer.modules() if isinstance(m, StreamingMultiheadAttention)]
        if any(not a.causal or a.weights_per_step or a.cross_attention for a in attns):
            raise ValueError("the temporal transformer needs causal self-attention without weights_per_step")
        own = attns[0].context if attns else 0  # 0: every layer replaced by TTT, nothing to window
        window = window or own
        if window is None:
            raise ValueError("this Moshi's attention has no window (context=None): set train.attention_window")
        super().__init__(lm, window, chunk, checkpointing)
        self.loss = loss
        self.terms = {"text": (0, 1), "audio": (1, 1 + lm.dep_q)}
        if attns and window != own:
            log.info("training attention window %d frames (the model's own: %s); streaming uses it too", window, own)
            for a in attns:
                a.context = window
            if isinstance(lm, TTTLMModel):
                lm.moshi_config["context"] = window

    @property
    def streams(self) -> int:
        return self.model.num_codebooks

    def layer_list(self) -> nn.ModuleList:
        return self.model.transformer.layers

    def ttt_layer_count(self) -> int:
        return sum(hasattr(layer, "ttt") for layer in self.layers())

    def prepare(self, codes: Tensor) -> Batch:
        lm = self.model
        B, K, L = codes.shape
        if K != lm.num_codebooks:
            raise ValueError(f"data has {K} streams per frame; this Moshi reads {lm.num_codebooks} "
                             f"(text + {lm.dep_q} model + {lm.n_q - lm.dep_q} user audio codebooks)")
        for name, rows, card in (("text", codes[:, :1], lm.text_card), ("audio", codes[:, 1:], lm.card)):
            top = int(rows.max())
            if top >= card:
                raise ValueError(f"data has token {top} in the {name} stream; this Moshi's {name} vocabulary has "
                                 f"{card} entries (tokenized for another model?)")
        initial = torch.tensor([lm.text_initial_token_id] + [lm.initial_token_id] * lm.n_q, device=codes.device)
        initial = initial.view(1, K, 1).expand(B, K, 1)
        inputs = torch.cat([initial, delay_sequence(lm.delays, codes, initial)], dim=2)
        rows = 1 + lm.dep_q
        targets = inputs[:, :rows, 1:]
        delays = torch.tensor(lm.delays[:rows], device=codes.device).view(1, rows, 1)
        valid = (torch.arange(L, device=codes.device).view(1, 1, L) >= delays) & (targets != lm.zero_token_id)
        weights = valid.float()
        pad = (targets[:, 0] == lm.text_padding_token_id) | (targets[:, 0] == lm.end_of_text_padding_id)
        weights[:, 0] *= torch.where(pad, self.loss.text_padding_weight, 1.0)
        weights[:, 1] *= self.loss.first_codebook_weight
        return Batch(inputs, weights)

    def embed(self, inputs: Tensor, pos: int) -> Tensor:
        lm = self.model
        x = lm.emb[0](inputs[:, 1])  # moshi's order: audio codebooks, then text
        for cb in range(1, lm.n_q):
            x = x + lm.emb[cb](inputs[:, cb + 1])
        x = x + lm.text_emb(inputs[:, 0])
        tr = lm.transformer
        if tr.positional_embedding in ("sin", "sin_rope"):
            positions = pos + torch.arange(x.shape[1], device=x.device).view(1, -1, 1)
            x = x + tr.positional_scale * create_sin_embedding(positions, x.shape[-1], tr.max_period, x.dtype)
        return x

    def _attention(self, attn: StreamingMultiheadAttention, h: Tensor, past: tuple[Tensor, Tensor] | None,
                   pos: int, mix: tp.Callable[[Tensor, Tensor], Tensor] | None = None,
                   ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Windowed attention; `mix(qkv, heads)` (a shared_qkv TTT branch) may change the heads that
        enter the output projection."""
        B, T, C = h.shape
        H = attn.num_heads
        D = C // H
        projected = attn.in_projs[0](h)
        q = projected[..., :C].view(B, T, H, D).transpose(1, 2)
        k, v = projected[..., C:].view(B, T, 2, H // attn.kv_repeat, D).permute(2, 0, 3, 1, 4)
        if attn.rope is not None:
            q, k = attn.rope(q, k, torch.full((B,), pos, device=h.device, dtype=torch.long), time_before_heads=False)
        if attn.kv_repeat > 1:
            k, v = expand_repeated_kv(k, attn.kv_repeat), expand_repeated_kv(v, attn.kv_repeat)
        out, kv = windowed_attention(q, k, v, self.window, past, self.chunk)
        heads = out.transpose(1, 2).reshape(B, T, C)
        return attn.out_projs[0](heads if mix is None else mix(projected, heads)), kv

    def layer_forward(self, layer: nn.Module, x: Tensor, carry: LayerCarry, pos: int) -> tuple[Tensor, LayerCarry]:
        """StreamingTransformerLayer / TTTTransformerLayer: the same residual composition as their forward."""
        h = layer.norm1(x)
        mode = getattr(layer, "ttt_mode", None)
        shared = mode is not None and layer.shares_attention_projections
        new = LayerCarry()

        def mix(qkv: Tensor, heads: Tensor) -> Tensor:
            y, new.ttt = layer.ttt(h, carry.ttt, qkv=qkv, heads=heads)
            return y

        if mode != "replace":
            update, new.kv = self._attention(layer.self_attn, h, carry.kv, pos, mix if shared else None)
            out = x.to(update) + layer.layer_scale_1(update)
        if mode is not None and not shared:
            y, new.ttt = layer.ttt(h, carry.ttt)
            out = x.to(y) + layer.layer_scale_1(y) if mode == "replace" else out + y.to(out)
        return feed_forward(layer, out), new

    def logits(self, x: Tensor, batch: Batch) -> list[Tensor]:
        lm = self.model
        out = lm.out_norm(x) if lm.out_norm else x
        text = lm.text_linear(out)[:, None]
        return [text, lm.forward_depformer_training(batch.inputs[:, :, 1:], out)]

    def export(self, out_dir: str) -> None:
        lm = self.model
        if isinstance(lm, TTTLMModel):
            lm.save_pretrained(out_dir)
        else:
            save_moshi_checkpoint(lm, infer_moshi_config(lm) | {"context": self.window}, out_dir)
