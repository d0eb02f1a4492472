"""probe-memory: the replayed inner model is the layer's own (weights after streaming, first losses at W0),
the copy/control excerpts differ only where they should, and the command runs end to end."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

pytest.importorskip("moshi")

from ttt_speech.config import TTTConfig  # noqa: E402
from ttt_speech.eval import commands, memory_probe  # noqa: E402
from ttt_speech.eval.data import Sequence, save_sequence  # noqa: E402
from ttt_speech.layers.ttt import TTTLayer  # noqa: E402
from ttt_speech.ops.ttt.reference import layer_norm  # noqa: E402


def copied_and_never_seen() -> tuple[torch.Tensor, torch.Tensor]:
    """4 streams of 160 frames (dim 32) whose frames 16-47 come again at 80-111, and the same streams with
    those source frames replaced: what a layer stores shows as a lower loss on the copy in the first."""
    g = torch.Generator().manual_seed(1)
    copied = torch.randn(4, 160, 32, generator=g)
    copied[:, 80:112] = copied[:, 16:48]
    never_seen = copied.clone()
    never_seen[:, 16:48] = torch.randn(4, 32, 32, generator=g)
    return copied, never_seen


@pytest.mark.parametrize("variant", ["ttt-lm", "fla"])
def test_replay_reaches_the_layers_own_weights(variant: str) -> None:
    torch.manual_seed(0)
    layer = TTTLayer(TTTConfig(dim=32, num_heads=2, mini_batch=16, variant=variant, base_lr=5.0))
    x = torch.randn(2, 48, 32)
    with memory_probe.record_inner_inputs([layer]) as calls, torch.no_grad():
        _, state = layer(x, layer.init_state(2))
    loss, W, b = memory_probe.replay_inner_losses(layer, calls)
    torch.testing.assert_close(W, state["W1"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b, state["b1"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(W, layer.W1.expand_as(W))  # three updates happened
    k, v = (t[:, :, :16] for t in calls[id(layer)][0][:2])
    ln_w, ln_b = (t[:, None, :] for t in layer.inner_norm())
    at_w0 = 0.5 * ((layer_norm(k @ layer.W1 + layer.b1, ln_w, ln_b, layer.config.eps) - (v - k)) ** 2).sum(-1)
    torch.testing.assert_close(loss[:, :, :16], at_w0.detach(), rtol=1e-5, atol=1e-5)
    assert not layer.inner_hooks  # the recorder is gone


def test_the_inner_hook_sees_forward_and_step_alike_until_removed() -> None:
    """The hook shows the same inner inputs whether the stream runs chunked or token by token."""
    torch.manual_seed(0)
    layer = TTTLayer(TTTConfig(dim=16, num_heads=2, mini_batch=4))
    x = torch.randn(1, 6, 16)
    seen: list[list[torch.Tensor]] = []
    handle = layer.register_inner_hook(lambda lay, q, k, v, a, c: seen.append([q, k, v, a, c]))
    with torch.no_grad():
        layer(x)
        state = layer.init_state(1)
        for t in range(6):
            layer.step(x[:, t:t + 1], state)
    handle.remove()
    layer(x)
    assert len(seen) == 7  # one forward, six steps, nothing after remove()
    for whole, tokens in zip(seen[0], zip(*seen[1:])):
        torch.testing.assert_close(whole, torch.cat(tokens, dim=2), rtol=1e-5, atol=1e-6)


def test_copy_and_control_differ_only_at_the_source() -> None:
    seqs = [Sequence("a", torch.arange(3 * 80).view(3, 80))]
    copied, control = memory_probe.copy_and_control(seqs, gap=10, span=6, context=4)
    L = 4 + 10 + 6
    assert copied.shape == control.shape == (2, 3, L)
    assert memory_probe.copy_and_control(seqs, gap=10, span=6, context=4, mini_batch=16)[0].shape == (2, 3, 32)
    for i, lo in enumerate((0, L)):
        original = seqs[0].tokens[:, lo:lo + L]
        assert torch.equal(copied[i, :, 14:20], original[:, 4:10]) and torch.equal(copied[i, :, :14], original[:, :14])
        assert torch.equal(copied[i, :, 20:], original[:, 20:])
        assert torch.equal(control[i, :, 4:10], seqs[0].tokens[:, lo + L:lo + L + 6])  # never seen before
        assert torch.equal(control[i, :, 10:], copied[i, :, 10:]) and torch.equal(control[i, :, :4], copied[i, :, :4])
    with pytest.raises(ValueError, match="needs"):
        memory_probe.copy_and_control(seqs, gap=30, span=6, context=4)
    with pytest.raises(ValueError, match="overlap"):
        memory_probe.copy_and_control(seqs, gap=4, span=6, context=4)


def probe_memory(lm, tmp_path, model: str, *argv: str) -> list:
    """`probe-memory MODEL --data HELD_OUT ARGV` over two random 160-frame sequences shaped for `lm`."""
    g = torch.Generator().manual_seed(1)
    for i in range(2):
        codes = torch.cat([torch.randint(0, lm.text_card, (1, 160), generator=g),
                           torch.randint(0, lm.card, (lm.num_audio_codebooks, 160), generator=g)])
        save_sequence(tmp_path / "held_out" / f"s{i}.npy", codes)
    parser = argparse.ArgumentParser()
    commands.add_probe_arguments(parser)
    return memory_probe.run(parser.parse_args([model, "--data", str(tmp_path / "held_out"), *argv]))


def test_probe_memory_command(tmp_path, capsys) -> None:
    from ttt_speech.moshi.tiny import build_tiny_hybrid

    lm = build_tiny_hybrid(0)
    rows = probe_memory(lm, tmp_path, "tiny", "--gaps", "24,28", "--span", "24", "--context", "4",
                        "--out", str(tmp_path / "rows.json"))
    n_layers = sum(isinstance(m, TTTLayer) for m in lm.modules())
    assert [(r.gap, r.layer) for r in rows] == [(g, i) for g in (24, 28) for i in range(n_layers)]
    assert all(r.source > 0 and r.copy > 0 and r.never_seen > 0 for r in rows)  # no NaN: scored tokens only
    assert json.loads((tmp_path / "rows.json").read_text())["tiny"][0]["gap"] == 24
    assert "| 24 | 0 |" in capsys.readouterr().out


def test_replayed_losses_show_storage_where_a_layer_stores() -> None:
    """Positive control: a layer with unit-scale projections and a moderate step size predicts a span
    copied 64 tokens later clearly better than the same span whose source it never saw."""
    torch.manual_seed(0)
    layer = TTTLayer(TTTConfig(dim=32, num_heads=1, mini_batch=16, variant="ttt-lm", base_lr=0.3))
    with torch.no_grad():
        layer.lr_weight.zero_()
        layer.lr_bias.fill_(4.0)
        for proj in (layer.q_proj, layer.k_proj, layer.v_proj):
            torch.nn.init.orthogonal_(proj.weight)
    copied, never_seen = copied_and_never_seen()
    losses = []
    for x in (copied, never_seen):
        with memory_probe.record_inner_inputs([layer]) as calls, torch.no_grad():
            layer(x, layer.init_state(4))
        losses.append(memory_probe.replay_inner_losses(layer, calls)[0][..., 96:112].mean().item())
    assert losses[0] < 0.85 * losses[1]  # measured: 9.73 vs 13.18 (-26 %)


def test_read_errors_show_storage_where_an_inplace_layer_stores() -> None:
    """An in-place layer's read of a pair's key points to the pair's value when the pair was written before
    (a span copied 64 frames later) and not when its source was never seen; nothing is read in chunk 0."""
    from ttt_speech.config import InPlaceConfig
    from ttt_speech.layers.inplace import InPlaceLayer

    torch.manual_seed(0)
    layer = InPlaceLayer(InPlaceConfig(dim=32, hidden=64, chunk=16, target_init_std=0.3, init_std=0.3))
    copied, never_seen = copied_and_never_seen()
    errors = []
    for x in (copied, never_seen):
        with memory_probe.record_inner_inputs([layer]) as calls, torch.no_grad():
            _, state = layer(x[:, :70], layer.init_state(4))
            for t in range(70, 160):  # streamed frame by frame, as the probe's scorer does
                layer.step(x[:, t], state)
        err = memory_probe.replay_read_errors(layer, calls)
        assert err.shape == (4, 160) and torch.equal(err[:, :16], torch.ones(4, 16))
        errors.append(err[:, 81:112].mean().item())  # the copy, past its first (spliced) pair
    assert errors[0] < 0.8 * errors[1]  # measured: 0.59 vs 1.04 (-43 %)
    assert not layer.pair_hooks  # the recorder is gone


def test_probe_memory_command_on_an_inplace_hybrid(tmp_path, capsys) -> None:
    """probe-memory streams a converted in-place Moshi and gives one row per gap and in-place layer."""
    from ttt_speech.moshi import convert, default_inplace_config
    from ttt_speech.moshi.tiny import build_tiny_lm

    lm = build_tiny_lm(0)
    model = convert(lm, layers=[1], ttt=default_inplace_config(lm, chunk=8, target_init_std=0.5, base_lr=30.0))
    model.save_pretrained(tmp_path / "inplace")
    rows = probe_memory(lm, tmp_path, f"inplace={tmp_path / 'inplace'}", "--gaps", "24", "--span", "24",
                        "--context", "4")
    assert [(r.gap, r.layer) for r in rows] == [(24, 0)]
    assert all(0 < x < 2 for r in rows for x in (r.source, r.copy, r.never_seen))  # read errors, no NaN
    assert rows[0].copy < 0.8 * rows[0].never_seen  # written 24 frames before; measured 0.319 vs 0.794 (-60 %)
    assert "| 24 | 0 |" in capsys.readouterr().out
