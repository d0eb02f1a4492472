"""probe-memory: the replayed memory is the layer's own (TTT weights / GDN state after the run, first losses at
the start state), the copy/control excerpts differ only where they should, the segment path records what
frame-by-frame streaming does, and the command runs end to end on every design."""

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
    with pytest.raises(ValueError, match="a, the longest held-out sequence: 80 frames; gap 30 needs 86"):
        memory_probe.copy_and_control(seqs, gap=30, span=6, context=4)  # 2 excerpts of 40 + a stand-in span
    longer = Sequence("b", torch.arange(3 * 100).view(3, 100))
    copied, _ = memory_probe.copy_and_control([*seqs, longer], gap=30, span=6, context=4)
    assert copied.shape == (2, 3, 40)  # only the sequence long enough for this gap
    assert torch.equal(copied[0, :, :34], longer.tokens[:, :34]) and torch.equal(copied[1, :, :4], longer.tokens[:, 40:44])
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
    rows = probe_memory(lm, tmp_path, "tiny", "--gaps-windows", "3,3.5", "--span", "24", "--context", "4",
                        "--out", str(tmp_path / "report" / "rows.json"))  # a folder not there yet
    n_layers = sum(isinstance(m, TTTLayer) for m in lm.modules())
    assert lm.transformer.layers[0].self_attn.context == 8  # so 3 and 3.5 windows are gaps of 24 and 28 frames
    assert [(r.gap, r.windows, r.layer) for r in rows] == [
        (g, w, i) for g, w in ((24, 3.0), (28, 3.5)) for i in (*range(n_layers), None)]
    assert all(r.source > 0 and r.copy > 0 and r.never_seen > 0 for r in rows)  # no NaN: scored tokens only
    assert all(r.low <= r.change <= r.high and r.high - r.low > 1e-3 and r.excerpts == 4 for r in rows)
    for gap in (24, 28):  # the mean row: each layer's change weighted alike
        per_layer = [r.change for r in rows if r.gap == gap and r.layer is not None]
        mean = next(r for r in rows if r.gap == gap and r.layer is None)
        assert mean.never_seen == pytest.approx(1.0) and mean.change == pytest.approx(sum(per_layer) / n_layers)
    saved = json.loads((tmp_path / "report" / "rows.json").read_text())["tiny"]
    assert (saved[0]["gap"], saved[0]["design"], saved[-1]["layer"]) == (24, "TTT ttt-lm", None)
    assert (tmp_path / "report" / "rows.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 24 | 3 | 0 |" in capsys.readouterr().out


BRANCHES = {"ttt-next": ("ttt", {"target": "next", "mini_batch": 4}),
            "gdn": ("gdn", {"gate_init": 0.5}),
            "inplace": ("inplace", {"chunk": 8, "target_init_std": 0.5, "base_lr": 30.0})}


def tiny_branch_hybrid(name: str):
    """A tiny Moshi with its layer 1 converted to one memory design (the memory switched on)."""
    from ttt_speech.moshi import convert
    from ttt_speech.moshi.convert import default_branch_config
    from ttt_speech.moshi.tiny import build_tiny_lm

    lm = build_tiny_lm(0)
    branch, overrides = BRANCHES[name]
    torch.manual_seed(0)
    return lm, convert(lm, layers=[1], ttt=default_branch_config(lm, "hybrid", branch, **overrides))


@pytest.mark.parametrize("name", BRANCHES)
def test_the_segment_path_records_what_streaming_does(name: str) -> None:
    """run_trunk (the temporal transformer over segments) shows each memory layer the inputs that the
    frame-by-frame scorer (LMGen-style streaming, depformer included) shows it, across segment cuts."""
    from ttt_speech.eval.models import MoshiScorer

    _, model = tiny_branch_hybrid(name)
    scorer = MoshiScorer(model, name)
    tokens = torch.cat([torch.randint(0, model.text_card, (3, 1, 40)),
                        torch.randint(0, model.card, (3, model.num_audio_codebooks, 40))], 1)
    layers = [m for m in model.modules() if isinstance(m, memory_probe.MEMORY_LAYERS)]
    recorded = []
    for run in (lambda: memory_probe.run_trunk(scorer, tokens, segment=16),
                lambda: scorer.score(tokens, torch.full((3, len(scorer.streams), 40), torch.nan), lambda step: None)):
        with memory_probe.record_inner_inputs(layers) as calls, torch.no_grad():
            run()
        dim = 1 if name == "inplace" else 2
        recorded.append([torch.cat(parts, dim) for parts in zip(*calls[id(layers[0])])])
    assert len(recorded[0]) == (2 if name == "inplace" else 4) and recorded[0][0].shape[dim] == 40
    for segmented, streamed in zip(*recorded):
        torch.testing.assert_close(segmented, streamed, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", [*BRANCHES, "vanilla"])
def test_segmented_scoring_equals_streaming_with_and_without_a_memory_reset(name: str) -> None:
    """MoshiScorer(segment=N) (the training path, a segment ending at the reset) gives every loss the frame-by-frame
    scorer gives, before and after a memory reset mid-segment; the reset changes the losses only with a memory."""
    from ttt_speech.eval.models import MoshiScorer
    from ttt_speech.moshi.tiny import build_tiny_lm

    model = build_tiny_lm(0) if name == "vanilla" else tiny_branch_hybrid(name)[1]
    with torch.no_grad():  # a TTT branch starts shut (gate 0): open it, so its state shows in the losses
        for layer in getattr(model, "memory_layers", list)():
            if hasattr(layer.memory, "gate_alpha"):
                layer.memory.gate_alpha.fill_(0.5)
    tokens = torch.cat([torch.randint(0, model.text_card, (2, 1, 45)),
                        torch.randint(0, model.card, (2, model.num_audio_codebooks, 45))], 1)
    outs = {}
    for segment in (None, 7, 16):
        for reset in (None, 23):
            outs[segment, reset] = torch.full((2, 1 + model.dep_q, 45), torch.nan)
            ticks: list[int] = []
            MoshiScorer(model, name, segment).score(tokens, outs[segment, reset], ticks.append, reset_at=reset)
            assert ticks[-1] == 45 and (reset is None or reset in ticks)
    for (segment, reset), out in outs.items():
        torch.testing.assert_close(out, outs[None, reset], rtol=1e-5, atol=1e-5, equal_nan=True)
    changed = (outs[None, 23] - outs[None, None]).abs().nan_to_num()
    assert changed[..., :22].max() == 0  # the reset acts after frame 23 streamed in (position 22 of delayed rows)
    assert (changed.max() == 0) == (name == "vanilla")
    if name != "vanilla":
        assert changed.max() > 1e-4


def test_delta_replay_reaches_the_layers_own_state() -> None:
    from ttt_speech.config import GatedDeltaNetConfig
    from ttt_speech.layers.gated_deltanet import GatedDeltaNetLayer

    torch.manual_seed(0)
    layer = GatedDeltaNetLayer(GatedDeltaNetConfig(dim=32, num_heads=2, chunk_size=8))
    x = torch.randn(2, 30, 32)
    with memory_probe.record_inner_inputs([layer]) as calls, torch.no_grad():
        _, state = layer(x[:, :11])
        layer.step(x[:, 11:], state)  # a chunked run, then a streamed one
    loss, S = memory_probe.replay_delta_losses(layer, calls)
    torch.testing.assert_close(S, state["S"], rtol=1e-4, atol=1e-5)
    v = calls[id(layer)][0][1]
    torch.testing.assert_close(loss[:, :, 0], 0.5 * v[:, :, 0].pow(2).sum(-1))  # frame 0 meets an empty state
    assert loss.shape == (2, 2, 30) and not layer.inner_hooks


def test_delta_losses_show_storage_where_a_gdn_layer_stores() -> None:
    """Positive control: a Gated DeltaNet with slow decay and strong writes regresses a span copied 64 frames
    later clearly better than the same span whose source it never saw."""
    from ttt_speech.config import GatedDeltaNetConfig
    from ttt_speech.layers.gated_deltanet import GatedDeltaNetLayer

    torch.manual_seed(0)
    layer = GatedDeltaNetLayer(GatedDeltaNetConfig(dim=32, num_heads=1, head_dim_k=32, head_dim_v=32,
                                                   use_short_conv=False, init_std=0.2))
    with torch.no_grad():
        layer.A_log.fill_(-6.0)  # decay exp(-e^-6 softplus(.)) ~ 0.999 per frame
        layer.b_proj.weight.zero_()  # beta = 1/2
    copied, never_seen = copied_and_never_seen()
    losses = []
    for x in (copied, never_seen):
        with memory_probe.record_inner_inputs([layer]) as calls, torch.no_grad():
            layer(x)
        losses.append(memory_probe.replay_delta_losses(layer, calls)[0][..., 81:112].mean().item())
    assert losses[0] < 0.85 * losses[1]  # measured: 4.67 vs 6.05 (-23 %)


@pytest.mark.parametrize("name", ["ttt-next", "gdn"])
def test_probe_memory_command_on_other_designs(name: str, tmp_path, capsys) -> None:
    """probe-memory runs a converted TTT-with-next-frame-targets and a Gated DeltaNet Moshi from their
    directories: one row per gap and memory layer and the mean, named by design."""
    lm, model = tiny_branch_hybrid(name)
    model.save_pretrained(tmp_path / name)
    rows = probe_memory(lm, tmp_path, f"{name}={tmp_path / name}", "--gaps", "24", "--span", "24", "--context", "4")
    assert [(r.gap, r.layer) for r in rows] == [(24, 0), (24, None)]
    assert rows[0].design == {"ttt-next": "TTT ttt-lm, next-frame targets", "gdn": "Gated DeltaNet"}[name]
    assert all(r.source > 0 and r.copy > 0 and r.never_seen > 0 for r in rows)
    assert f"## {name}, inner lr x1: {rows[0].design}" in capsys.readouterr().out


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
    assert not layer.inner_hooks  # the recorder is gone


def test_read_errors_of_a_decaying_inplace_layer_fade_its_pairs_as_its_stream_does() -> None:
    """With decay < 1 the replay reads each pair faded by the layer's own lambda, as the frame-by-frame oracle
    does, and not as a delta that never forgets."""
    from ttt_speech.config import InPlaceConfig
    from ttt_speech.layers.inplace import InPlaceLayer
    from ttt_speech.ops.inplace.naive import inplace_naive

    torch.manual_seed(0)
    layer = InPlaceLayer(InPlaceConfig(dim=16, hidden=32, chunk=4, target_init_std=0.3, init_std=0.3, decay=0.3))
    with memory_probe.record_inner_inputs([layer]) as calls, torch.no_grad():
        layer(torch.randn(2, 24, 16), layer.init_state(2))
    k, v = (torch.cat(parts, dim=1) for parts in zip(*calls[id(layer)]))  # what the probe recorded
    zeros = (k.new_zeros(2, 16, 32), k.new_zeros(2, 4, 32), v.new_zeros(2, 4, 16), torch.zeros(2, dtype=torch.long))
    faded = inplace_naive(k, k, v, *zeros, 4, decay=torch.sigmoid(layer.decay_logit).item())[0]
    kept = inplace_naive(k, k, v, *zeros, 4)[0]
    err = memory_probe.replay_read_errors(layer, calls)
    torch.testing.assert_close(err, 1 - torch.nn.functional.cosine_similarity(faded, v, dim=-1))
    assert (err - (1 - torch.nn.functional.cosine_similarity(kept, v, dim=-1))).abs()[:, 8:].max() > 1e-3


def test_probe_memory_command_on_an_inplace_hybrid(tmp_path, capsys) -> None:
    """probe-memory streams a converted in-place Moshi and gives one row per gap and in-place layer."""
    lm, model = tiny_branch_hybrid("inplace")
    model.save_pretrained(tmp_path / "inplace")
    rows = probe_memory(lm, tmp_path, f"inplace={tmp_path / 'inplace'}", "--gaps", "24", "--span", "24",
                        "--context", "4")
    assert [(r.gap, r.layer) for r in rows] == [(24, 0), (24, None)]
    assert all(0 < x < 2 for r in rows for x in (r.source, r.copy, r.never_seen))  # read errors, no NaN
    assert rows[0].copy < 0.8 * rows[0].never_seen  # written 24 frames before; measured 0.314 vs 0.837 (-62 %)
    assert rows[0].high < -0.3  # the interval excludes "nothing kept": measured [-68.5 %, -58.3 %]
    assert "| 24 | 3 | 0 |" in capsys.readouterr().out
