"""A Moshi TTT hybrid (or a plain Moshi, for baselines) wrapped for segment training.

The forward is the integration's (`ttt_speech.moshi.segments`: the layers' own residual composition,
windowed attention, the branch state and attention window carried across segments); this adds the
data checks, the loss weights and the export. The
loss is moshi-finetune's: cross-entropy on the text stream and on the model's own audio
codebooks (the user's codebooks are inputs only), text padding weighted x0.5 and the first audio
codebook x100 by default, each of the two normalised by its own total weight.
"""

from __future__ import annotations

import logging
import typing as tp

import torch
from moshi.models.lm import LMModel
from moshi.modules.transformer import StreamingMultiheadAttention
from torch import Tensor, nn

from ttt_speech.moshi import (HybridLMModel, convert, default_branch_config, load_hybrid, segments,
                              set_attention_window)
from ttt_speech.moshi.files import checkpoint_info, save_moshi_checkpoint
from ttt_speech.moshi.config import infer_moshi_config
from ttt_speech.moshi.tiny import build_tiny_lm, tiny_lm_config
from ttt_speech.names import MEMORY
from ttt_speech.train.config import LossConfig, ModelConfig
from ttt_speech.train.model import Batch, LayerCarry, SegmentLM

log = logging.getLogger(__name__)


def load_moshi(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> LMModel:
    """The model `cfg` names, converted to a TTT hybrid unless it is one already or `layers` is empty."""
    if cfg.hybrid:
        return load_hybrid(cfg.hybrid, device=device, dtype=dtype)
    if cfg.tiny:
        config = tiny_lm_config()
        lm = build_tiny_lm(cfg.seed, config, device=device, dtype=dtype)
    else:
        info = checkpoint_info(tp.cast(str, cfg.pretrained), cfg.mimi_config)
        lm, config = info.get_moshi(device=device, dtype=dtype), info.raw_config
    if cfg.layers == []:
        return lm
    torch.manual_seed(cfg.seed)  # the new TTT layers' initialisation
    ttt = default_branch_config(lm, tp.cast(tp.Any, cfg.mode), cfg.branch, **cfg.memory)
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
            set_attention_window(lm, window)

    @property
    def streams(self) -> int:
        return self.model.num_codebooks

    def layer_list(self) -> nn.ModuleList:
        return self.model.transformer.layers

    def memory_layer_count(self) -> int:
        return sum(hasattr(layer, MEMORY) for layer in self.layers())

    def prepare(self, codes: Tensor, scored: Tensor | None = None) -> Batch:
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
        inputs = segments.delayed_inputs(lm, codes)
        rows = 1 + lm.dep_q
        targets = inputs[:, :rows, 1:]
        delays = torch.tensor(lm.delays[:rows], device=codes.device).view(1, rows, 1)
        frame = torch.arange(L, device=codes.device).view(1, 1, L) - delays  # the frame each target holds
        valid = (frame >= 0) & (targets != lm.zero_token_id)
        if scored is not None:  # a stream's target is scored when the frame it holds (through its delay) is
            valid &= scored[:, frame[0].clamp(min=0)]
        weights = valid.float()
        pad = (targets[:, 0] == lm.text_padding_token_id) | (targets[:, 0] == lm.end_of_text_padding_id)
        weights[:, 0] *= torch.where(pad, self.loss.text_padding_weight, 1.0)
        weights[:, 1] *= self.loss.first_codebook_weight
        return Batch(inputs, weights)

    def layer_forward(self, layer: nn.Module, x: Tensor, carry: LayerCarry, pos: int) -> tuple[Tensor, LayerCarry]:
        x, kv, memory = segments.layer_segment(layer, x, carry.kv, carry.memory, pos, self.window, self.chunk)
        return x, LayerCarry(memory, kv)

    def logits(self, batch: Batch, pos: int, layers: tp.Callable[[Tensor], Tensor]) -> list[Tensor]:
        return segments.logits(self.model, batch.inputs, pos, layers)

    def export(self, out_dir: str) -> None:
        lm = self.model
        if isinstance(lm, HybridLMModel):
            lm.save_pretrained(out_dir)
        else:
            save_moshi_checkpoint(lm, infer_moshi_config(lm) | {"context": self.window}, out_dir)
