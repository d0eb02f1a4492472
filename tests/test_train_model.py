"""Segment-by-segment training forward == the integrations' own forward on short sequences.

Moshi: `LMModel.forward` (dense mask, windowed by its `context`) and moshi-finetune's loss
(re-implemented here from LMOutput). transformers: the converted model's forward (its hook
windows attention). Sequences are 5x the attention window, so the window and the carried keys
matter; the TTT gates are open, so the carried TTT state matters too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("moshi")

from moshi.models.lm import LMModel, LMOutput  # noqa: E402
from moshi.models.lm_utils import _undelay_sequence  # noqa: E402

from ttt_speech.moshi import convert, default_gdn_config, default_inplace_config, default_ttt_config  # noqa: E402
from ttt_speech.moshi.tiny import build_tiny_lm  # noqa: E402
from ttt_speech.train.config import LossConfig  # noqa: E402
from ttt_speech.train.model import SegmentLM  # noqa: E402
from ttt_speech.train.moshi_model import MoshiSegmentLM  # noqa: E402

T = 40  # tiny Moshi's attention window (context) is 8
CUTS = [[T], [16, 24], [7, 9, 24], [5] * 8]


def tiny(mode: str | None, seed: int = 0) -> LMModel:
    lm = build_tiny_lm(seed)
    if mode is None:
        return lm
    torch.manual_seed(seed)
    if mode == "gdn":  # the Gated DeltaNet branch in every layer, chunks not aligned to the cuts
        return convert(lm, "all", "hybrid", default_gdn_config(lm, gate_init=0.6, chunk_size=4))
    if mode == "inplace":  # every layer's MLP with fast weights whose writes matter, chunks not aligned to the cuts
        return convert(lm, "all", "hybrid", default_inplace_config(lm, chunk=4, target_init_std=1.0, base_lr=300.0))
    if mode == "inplace-decay":  # ... whose delta fades by 0.5 at each chunk end
        return convert(lm, "all", "hybrid", default_inplace_config(lm, chunk=4, target_init_std=1.0, base_lr=300.0,
                                                                   decay=0.5))
    if mode == "shared":  # TTT reading the attention's q/k/v, mixed into its heads
        return convert(lm, "all", "hybrid", default_ttt_config(lm, gate_init=0.6, mini_batch=4, shared_qkv=True))
    layers = "all" if mode == "hybrid" else [1]
    return convert(lm, layers, mode, default_ttt_config(lm, mode, gate_init=0.6 if mode == "hybrid" else 10.0,
                                                         mini_batch=4))


def random_codes(lm: LMModel, B: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, lm.card, (B, lm.num_codebooks, T), generator=g)
    codes[:, 0] = torch.randint(0, lm.text_card, (B, T), generator=g)
    codes[:, 0, ::5] = lm.text_padding_token_id  # some padding, to exercise the x0.5 weight
    codes[:, 0, 1::7] = lm.end_of_text_padding_id
    codes[0, :, -3:] = -1  # a padded tail: no input, no loss
    return codes


def segment_logits(seg: SegmentLM, codes: torch.Tensor, cuts: list[int]) -> list[torch.Tensor]:
    """The segment loop of SegmentLM.forward, keeping the logits (per term, concatenated over time)."""
    batch = seg.prepare(codes)
    carry, at, parts = None, 0, []
    for n in cuts:
        logits, carry = seg.segment_logits(batch.segment(at, at + n), carry)
        parts.append(logits)
        at += n
    return [torch.cat(p, dim=2) for p in zip(*parts)]


def segment_losses(seg: SegmentLM, codes: torch.Tensor, cuts: list[int]) -> torch.Tensor:
    batch = seg.prepare(codes)
    sums, carry, at = torch.zeros(len(seg.terms)), None, 0
    for n in cuts:
        part, carry = seg(batch.segment(at, at + n), carry)
        sums, at = sums + part, at + n
    return sums / seg.term_weights(batch)


def finetune_losses(out: LMOutput, codes: torch.Tensor, lm: LMModel, pad_w: float = 0.5, first_w: float = 100.0
                    ) -> torch.Tensor:
    """moshi-finetune's compute_loss_with_mask for text and audio, from LMModel.forward's output."""
    def masked_ce(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        keep = weights > 0
        ce = F.cross_entropy(logits[keep].float(), target[keep], reduction="none")
        return (ce * weights[keep]).sum() / weights.sum()

    text_t = codes[:, :1]
    text_w = out.text_mask.float()
    text_w[(text_t == lm.text_padding_token_id) | (text_t == lm.end_of_text_padding_id)] *= pad_w
    audio_t = codes[:, 1:1 + lm.dep_q]
    audio_w = out.mask.float()
    audio_w[:, 0] *= first_w
    return torch.stack([masked_ce(out.text_logits, text_t, text_w), masked_ce(out.logits, audio_t, audio_w)])


@pytest.mark.parametrize("mode", ["hybrid", "shared", "replace", "gdn", "inplace", "inplace-decay", None])
def test_moshi_segments_equal_lmmodel_forward(mode: str | None) -> None:
    lm = tiny(mode)
    codes = random_codes(lm)
    with torch.no_grad():
        ref = lm(codes)
        seg = MoshiSegmentLM(lm, None, None, False, LossConfig())
        ref_losses = finetune_losses(ref, codes, lm)
        for cuts in CUTS:
            text, audio = segment_logits(seg, codes, cuts)
            audio, valid = _undelay_sequence(lm.delays[1:1 + lm.dep_q], audio)
            keep = ref.text_mask[..., None].expand_as(text)
            assert (text - ref.text_logits)[keep].abs().max() < 2e-5
            keep = (valid & ref.mask)[..., None].expand_as(audio)
            assert (audio - ref.logits)[keep].abs().max() < 2e-5
            assert (segment_losses(seg, codes, cuts) - ref_losses).abs().max() < 2e-5


def test_moshi_training_window_shorter_than_the_models() -> None:
    """A training window of 4 frames equals moshi's forward with context=4 and is what streaming then uses."""
    lm = tiny("hybrid")
    codes = random_codes(lm)
    seg = MoshiSegmentLM(lm, 4, 3, False, LossConfig())
    assert all(layer.self_attn.context == 4 for layer in lm.transformer.layers)
    assert lm.moshi_config["context"] == 4
    with torch.no_grad():
        ref = finetune_losses(lm(codes), codes, lm)
        assert (segment_losses(seg, codes, [13, 27]) - ref).abs().max() < 2e-5
        far = finetune_losses(tiny("hybrid")(codes), codes, lm)  # the model's own window (8) differs
    assert (far - ref).abs().max() > 1e-3


def test_moshi_loss_weights_are_moshi_finetunes() -> None:
    lm = tiny("hybrid")
    codes = random_codes(lm)
    w = MoshiSegmentLM(lm, None, None, False, LossConfig()).prepare(codes).weights  # [B, 1 + dep_q, T] delayed
    text = codes[:, 0]
    pad = (text == lm.text_padding_token_id) | (text == lm.end_of_text_padding_id)
    assert torch.equal(w[1, 0], torch.where(pad[1], 0.5, 1.0))
    assert torch.equal(w[0, 0, -3:], torch.zeros(3))  # padded tail
    assert torch.equal(w[1, 1], torch.full((T,), 100.0))  # first model codebook, delay 0
    assert w[1, 2, 0] == 0 and torch.equal(w[1, 2, 1:], torch.ones(T - 1))  # second one: delayed one frame
    assert w.shape[1] == 1 + lm.dep_q  # the user's codebooks are inputs only
    custom = MoshiSegmentLM(lm, None, None, False, LossConfig(0.25, 7.0)).prepare(codes).weights
    assert torch.equal(custom[1, 0], torch.where(pad[1], 0.25, 1.0)) and custom[1, 1, 5] == 7.0


def test_out_of_vocabulary_tokens_are_a_clear_error() -> None:
    lm = tiny("hybrid")
    codes = random_codes(lm)
    codes[0, 0, 3] = lm.text_card + 5
    with pytest.raises(ValueError, match="token 69 in the text stream"):
        MoshiSegmentLM(lm, None, None, False, LossConfig()).prepare(codes)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    codes = random_codes(tiny(None))
    grads = []
    for ckpt in (False, True):
        seg = MoshiSegmentLM(tiny("hybrid"), None, None, ckpt, LossConfig())
        segment_losses(seg, codes, [16, 24]).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for n, p in seg.named_parameters() if ".memory." in n]))
    assert grads[0].abs().max() > 1e-4
    assert (grads[0] - grads[1]).abs().max() < 1e-7


@pytest.mark.parametrize("mode,layers", [("hybrid", [0, 1]), ("replace", [1]), ("inplace", [0, 1])])
def test_hf_segments_equal_converted_model_forward(mode: str, layers: list[int]) -> None:
    pytest.importorskip("transformers", minversion="5.23")  # pyproject's hf extra
    from ttt_speech import TTTConfig
    from ttt_speech.config import InPlaceConfig
    from ttt_speech.hf import convert as hf_convert
    from ttt_speech.train.hf_model import HFSegmentLM, tiny_llama

    branch = (InPlaceConfig(dim=32, hidden=64, chunk=4, base_lr=100.0, target_init_std=1.0) if mode == "inplace"
              else TTTConfig(dim=32, num_heads=4, mini_batch=4, gate_init=0.5))
    model = hf_convert(tiny_llama(0), layers, "hybrid" if mode == "inplace" else mode, branch,
                       attention_window=8).train()
    ids = torch.randint(0, 64, (2, T + 1), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids[:, :-1], use_cache=False).logits
        seg = HFSegmentLM(model, None, None, False)
        ref_loss = F.cross_entropy(ref.flatten(0, 1), ids[:, 1:].flatten())
        for cuts in CUTS:
            (logits,) = segment_logits(seg, ids[:, None], cuts)
            assert (logits[:, 0] - ref).abs().max() < 2e-5
            assert abs(segment_losses(seg, ids[:, None], cuts).item() - ref_loss.item()) < 2e-5
        if mode == "inplace":  # the memory matters: with nothing written, later tokens read other logits
            for layer in model.model.layers:
                layer.mlp.memory.target_proj.weight.zero_()
            assert (model(ids[:, :-1], use_cache=False).logits - ref)[:, 4:].abs().max() > 1e-2


def test_hf_segments_equal_a_mixtral_hybrids_forward() -> None:
    """Mixtral's decoder layers (attention, then the experts; their router logits are only recorded by the
    model forward's output hooks, which segments do not ask for) run their own forward on segments."""
    transformers = pytest.importorskip("transformers", minversion="5.23")
    from ttt_speech import TTTConfig
    from ttt_speech.hf import convert as hf_convert
    from ttt_speech.train.hf_model import HFSegmentLM

    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=1024, attn_implementation="sdpa")
    model = hf_convert(transformers.MixtralForCausalLM(config), [1], "hybrid",
                       TTTConfig(dim=32, num_heads=4, mini_batch=4, gate_init=0.5), attention_window=8).train()
    ids = torch.randint(0, 64, (2, T + 1), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids[:, :-1], use_cache=False)
        seg = HFSegmentLM(model, None, None, False)
        for cuts in CUTS[1:3]:
            (logits,) = segment_logits(seg, ids[:, None], cuts)
            assert (logits[:, 0] - ref.logits).abs().max() < 2e-5
