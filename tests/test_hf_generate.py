"""Bounded-memory decoding: TTT state through forward/generate, padding, and constant cache + state bytes.

Every model here has its TTT gates open (tanh(0.5)) and its TTT weights moved off their init, so a
TTT state that is dropped, reset or polluted by padding shows up in the logits.
"""

import copy
import itertools

import pytest
import torch

pytest.importorskip("transformers", minversion="5.23")  # pyproject's hf extra

from transformers import DynamicCache, LogitsProcessorList  # noqa: E402

from helpers.hf import (  # noqa: E402
    FAMILIES, HEADS, HIDDEN, KV_HEADS, VOCAB, BytesProbe, perturb_ttt, tiny_model, ttt_config,
)
from ttt_speech.hf import MemoryCache, convert  # noqa: E402
from ttt_speech.hf.compat import cache_kwargs, output_cache  # noqa: E402

W, K = 8, 4  # attention window, TTT mini-batch


def converted(family: str = "llama", mode: str = "hybrid", layers=(1, 2), seed: int = 0):
    model = convert(tiny_model(family, seed=seed), layers=layers, mode=mode, ttt=ttt_config(0.5, K),
                    attention_window=W)
    perturb_ttt(model)
    return model


def ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def feed(model, tokens: torch.Tensor, cache, mask: torch.Tensor | None = None, chunks=None) -> torch.Tensor:
    """Logits of `tokens` fed through forward in pieces (default: one token at a time) with `cache`."""
    T = tokens.shape[1]
    bounds = chunks or list(range(T + 1))
    logits = []
    for s, e in itertools.pairwise(bounds):
        m = None if mask is None else mask[:, :e]
        logits.append(model(tokens[:, s:e], attention_mask=m, use_cache=True, **cache_kwargs(cache)).logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("family,mode", [("llama", "hybrid"), ("qwen2", "hybrid"), ("llama", "replace")])
def test_teacher_forced_logits_equal_incremental_decoding(family, mode):
    """One chunked forward over 21 tokens (> 2 windows, 5 mini-batches) == token-by-token and mixed decoding."""
    model = converted(family, mode)
    x = ids(2, 21)
    with torch.no_grad():
        full = model(x, use_cache=False).logits
    cache = MemoryCache(model.config)
    stepwise = feed(model, x, cache)
    assert (stepwise - full).abs().max().item() <= 1e-4
    mixed = feed(model, x, MemoryCache(model.config), chunks=[0, 11, 12, 13, 19, 21])
    assert (mixed - full).abs().max().item() <= 1e-4
    cache.reset()  # a reset cache is a fresh one
    assert (feed(model, x[:, :5], cache) - full[:, :5]).abs().max().item() <= 1e-4
    with torch.no_grad():  # the TTT branch matters: closing the gates moves the logits a lot
        for layer in model.model.layers:
            if hasattr(layer.self_attn, "memory"):
                layer.self_attn.memory.gate_alpha.zero_()
        assert (model(x, use_cache=False).logits - full).abs().max().item() > 0.1


def generate(model, prompt, n: int, mask=None, **kw):
    return model.generate(prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                          return_dict_in_generate=True, output_logits=True, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_equals_a_manual_forward_loop(family):
    model = converted(family)
    prompt = ids(2, 5)
    out = generate(model, prompt, 3 * W, do_sample=False)
    assert isinstance(output_cache(out), MemoryCache)  # generate's own DynamicCache, adopted
    assert sorted(output_cache(out).memory_states) == [1, 2]
    cache, tokens, logits = MemoryCache(model.config), prompt, []
    eos = torch.tensor([model.generation_config.eos_token_id])
    with torch.no_grad():
        step = model(prompt, past_key_values=cache).logits[:, -1]  # the pre-5.24 spelling works on every release
        for _ in range(3 * W):
            logits.append(step)
            nxt = step.index_fill(-1, eos, float("-inf")).argmax(-1, keepdim=True)  # as min_new_tokens does
            tokens = torch.cat([tokens, nxt], dim=1)
            step = model(nxt, past_key_values=cache).logits[:, -1]
    assert torch.equal(out.sequences, tokens)
    assert (torch.stack(out.logits, 1) - torch.stack(logits, 1)).abs().max().item() <= 1e-5
    # generate's other entries: chunked prefill, and prompt embeddings (LLaMA-Omni generates from those)
    chunked = generate(model, prompt, 3 * W, do_sample=False, prefill_chunk_size=2)
    embeds = model.generate(inputs_embeds=model.model.embed_tokens(prompt), max_new_tokens=3 * W,
                            min_new_tokens=3 * W, do_sample=False)
    assert torch.equal(chunked.sequences, tokens) and torch.equal(embeds, tokens[:, 5:])


def test_sampled_generate_equals_replaying_its_tokens():
    model = converted("llama")
    prompt = ids(2, 4, seed=3)
    torch.manual_seed(0)
    out = generate(model, prompt, 2 * W, do_sample=True, top_k=0, temperature=1.0)
    replay = feed(model, out.sequences[:, :-1], MemoryCache(model.config), chunks=[0, 4, *range(5, 4 + 2 * W)])
    assert (torch.stack(out.logits, 1) - replay[:, 3:]).abs().max().item() <= 1e-5
    torch.manual_seed(1)
    other = generate(model, prompt, 2 * W, do_sample=True, top_k=0, temperature=1.0)
    assert not torch.equal(other.sequences, out.sequences)  # it really sampled


def state_rows(cache: MemoryCache, layer: int, row: int) -> dict[str, torch.Tensor]:
    return {k: t[row] for k, t in cache.memory_states[layer].tensors.items()}


def test_left_padding_never_updates_the_ttt_state():
    """A left-padded batch decodes each stream exactly as it decodes alone: pads neither teach nor advance."""
    model = converted("llama")
    long, short = ids(1, 6, seed=4), ids(1, 3, seed=5)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])

    cache = MemoryCache(model.config)
    feed(model, batch, cache, mask, chunks=[0, 6])
    alone = MemoryCache(model.config)
    feed(model, short, alone, chunks=[0, 3])
    for layer in (1, 2):
        got, ref = state_rows(cache, layer, 1), state_rows(alone, layer, 0)
        assert got["offset"].item() == 3 % K
        assert max((got[k] - ref[k]).abs().max().item() for k in ref) <= 1e-5
    # control: the same prompt with its pads counted as tokens ends elsewhere
    counted = MemoryCache(model.config)
    feed(model, batch, counted, torch.ones_like(mask), chunks=[0, 6])
    assert state_rows(counted, 1, 1)["offset"].item() == 6 % K != 3 % K

    out = generate(model, batch, 2 * W, mask=mask, do_sample=False, pad_token_id=0)
    for row, prompt in ((0, long), (1, short)):
        single = generate(model, prompt, 2 * W, do_sample=False)
        assert torch.equal(out.sequences[row, -2 * W:], single.sequences[0, -2 * W:])
        diff = (torch.stack(out.logits, 1)[row] - torch.stack(single.logits, 1)[0]).abs().max().item()
        assert diff <= 1e-4


@pytest.mark.parametrize("mode", ["hybrid", "replace"])
def test_generating_ten_windows_keeps_cache_and_state_bytes_constant(mode):
    B, n = 2, 10 * W
    model = converted("llama", mode)
    cache = MemoryCache(model.config)
    probe = BytesProbe(cache)
    out = generate(model, ids(B, 4), n, do_sample=False, past_key_values=cache,
                   logits_processor=LogitsProcessorList([probe]))
    assert out.sequences.shape[1] == 4 + n
    after_fill = [b for length, b in probe.rows if length > W]
    assert len(after_fill) >= 9 * W and len(set(after_fill)) == 1
    attn_layers = 3 if mode == "hybrid" else 1  # replace mode: layers 1, 2 have no KV at all
    kv = attn_layers * 2 * B * KV_HEADS * W * (HIDDEN // HEADS) * 4  # fp32 keys + values, W tokens
    ttt = 2 * cache.memory_states[1].nbytes
    assert cache.kv_nbytes == kv and cache.memory_nbytes == ttt and after_fill[0] == kv + ttt
    # control: the original model's cache grows with every token
    original, dyn = tiny_model("llama"), DynamicCache()
    probe = BytesProbe(dyn)
    generate(original, ids(B, 4), n, do_sample=False, past_key_values=dyn,
             logits_processor=LogitsProcessorList([probe]))
    assert probe.rows[-1][1] > 5 * probe.rows[W][1]


def test_generate_refuses_caches_it_cannot_bound():
    model = converted("llama")
    filled = DynamicCache(config=model.config)
    tiny_model("llama")(ids(1, 3), past_key_values=filled)
    with pytest.raises(ValueError, match="already holds tokens"):
        model(ids(1, 1), past_key_values=filled)
    with pytest.raises(NotImplementedError, match="crop"):
        MemoryCache(model.config).crop(1)


@pytest.mark.parametrize("mode", ["hybrid", "replace"])
def test_beam_search_scores_equal_a_fresh_pass_over_each_beam(mode):
    """Each beam's score, built step by step through reordered caches, is the log-probability a fresh
    forward gives its tokens: a beam that carried another beam's TTT state would score differently."""
    model = converted("llama", mode)
    prompt, n = ids(2, 5, seed=3), 6  # 11 tokens: past the window (8) and over two TTT mini-batches
    out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, num_beams=3, num_return_sequences=3,
                         length_penalty=0.0, do_sample=False, return_dict_in_generate=True, output_scores=True)
    seqs = out.sequences
    assert seqs.shape == (6, 11)
    with torch.no_grad():
        logp = model(seqs, use_cache=False).logits.log_softmax(-1)
    fresh = logp[:, 4:-1].gather(-1, seqs[:, 5:, None])[..., 0].sum(-1)
    torch.testing.assert_close(out.sequences_scores, fresh, rtol=1e-4, atol=1e-4)
    assert len({tuple(s) for s in seqs[:3].tolist()}) == 3  # three different beams per prompt


def test_training_forward_uses_no_cache_and_right_padding_is_harmless():
    """In train mode the hook makes no MemoryCache; trailing pads do not change the real tokens' logits."""
    model = converted("llama").train()
    x = ids(2, 12)
    mask = torch.ones_like(x)
    mask[1, 9:] = 0
    out = model(x, attention_mask=mask, labels=x)
    assert not isinstance(output_cache(out), MemoryCache)
    with torch.no_grad():
        alone = model(x[1:, :9], use_cache=False).logits
    assert (out.logits[1, :9] - alone[0]).abs().max().item() <= 1e-5
    out.loss.backward()
    ttt = model.model.layers[1].self_attn.memory
    assert all(p.grad is not None for p in ttt.parameters())
    for p in (ttt.gate_alpha, ttt.q_proj.weight, ttt.W1, ttt.ttt_norm_weight):  # the initial fast weights learn too
        assert p.grad.abs().max().item() > 0
    left = mask.flip(1)
    with pytest.raises(ValueError, match="right padding"):
        model(x, attention_mask=left)
    with torch.no_grad():  # the same left-padded batch is fine for inference
        model(x, attention_mask=left)
    assert copy.deepcopy(model) is not None  # converted models stay copyable (hooks, dynamic classes)
