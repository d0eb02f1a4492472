"""`train.own_prefix`: sequences that hold the model's own samples after a real prompt, scored on the real
frames only (the delayed codebooks of the own frames included); the config says what is wrong in one line."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("moshi")

from helpers.train import tiny_config  # noqa: E402
from ttt_speech.engine.metrics import read_metrics  # noqa: E402
from ttt_speech.errors import UsageError  # noqa: E402
from ttt_speech.layers.inplace import InPlaceLayer, writes_scaled  # noqa: E402
from ttt_speech.train.config import config_from_dict, load_config  # noqa: E402
from ttt_speech.train.loop import Trainer  # noqa: E402

P, F, T = 4, 8, 24  # prompt, own frames, stage length (tiny_config's first stage)
OWN = {"prob": 1.0, "prompt": P, "frames": F}


def trainer(tmp: Path, own: dict, **over: object) -> Trainer:
    return Trainer(config_from_dict(tiny_config(tmp, **{"train.own_prefix": own}, **over)))


def test_the_sequence_is_prompt_own_samples_then_the_real_continuation(tmp_path: Path) -> None:
    t = trainer(tmp_path, OWN)
    seg, lm = t.seg, t.seg.model
    rows = 1 + lm.dep_q
    codes = t.train_data.batch(0, 2, T, 0)
    out, scored = t.own_prefix(codes, 0, 0, 0)
    assert lm.training  # generation ran in eval mode, training goes on in training mode
    assert torch.equal(out[..., :P], codes[..., :P])  # the real prompt
    assert torch.equal(out[..., P + F:], codes[..., P:T - F])  # the real sequence again from the prompt's end
    assert torch.equal(out[:, rows:, P:P + F], codes[:, rows:, P:P + F])  # the user heard during the own frames
    assert (out[:, :rows, P:P + F] != codes[:, :rows, P:P + F]).float().mean() > 0.5  # the model's own samples
    assert scored.tolist() == [[not P <= i < P + F for i in range(T)]] * 2

    weights, teacher = seg.prepare(out, scored).weights, seg.prepare(out).weights  # [B, rows, T], delayed
    assert lm.delays[:rows] == [0, 0, 1]
    for k, delay in enumerate(lm.delays[:rows]):  # a stream's own targets sit `delay` frames later
        own = torch.zeros(T, dtype=torch.bool)
        own[P + delay:P + F + delay] = True
        assert torch.equal(weights[:, k], torch.where(own, 0.0, teacher[:, k])), k
    assert (teacher[:, :, P:P + F + 1] > 0).all()  # so exactly 8 targets per stream went: 24 per sequence
    assert ((weights == 0) & (teacher > 0)).sum().item() == 2 * rows * F


def test_each_sample_is_drawn_on_its_own_so_any_process_recomputes_it(tmp_path: Path) -> None:
    t = trainer(tmp_path, OWN | {"prob": 0.5})
    chosen, seed = t.own_prefix.draws(0, 0, 8)
    assert 0 < chosen.sum() < 8
    assert torch.equal(t.own_prefix.draws(0, 4, 4)[0], chosen[4:]) and t.own_prefix.draws(0, 0, 8)[1] == seed
    assert t.own_prefix.draws(1, 0, 8)[1] != seed  # another stage, other draws
    codes = t.train_data.batch(0, 8, T, 0)
    out, scored = t.own_prefix(codes, 0, 0, 0)
    assert torch.equal(out[~chosen], codes[~chosen]) and scored[~chosen].all()
    assert not torch.equal(out[chosen], codes[chosen]) and (~scored[chosen]).sum() == chosen.sum() * F


def test_every_leaves_the_other_steps_teacher_forced(tmp_path: Path) -> None:
    t = trainer(tmp_path, OWN | {"every": 3})
    codes = t.train_data.batch(0, 2, T, 0)
    for step in (1, 2, 4, 5):
        out, scored = t.own_prefix(codes, 0, 0, step)
        assert torch.equal(out, codes) and scored.all(), step
    for step in (0, 3, 6):
        out, scored = t.own_prefix(codes, 0, 0, step)
        assert (~scored).sum() == 2 * F and not torch.equal(out, codes), step


def test_a_short_run_trains_and_logs_the_generation_time(tmp_path: Path) -> None:
    t = trainer(tmp_path, OWN | {"prob": 0.5}, **{"train.batch_size": 4,
                                                   "stages": [{"seq_len": T, "steps": 2, "lr": 1e-3}]})
    assert t.run().finished
    train = [r for r in read_metrics(t.cfg.run_dir) if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["own_prefix_s"] > 0 for r in train)
    assert train[0]["loss"] != pytest.approx(train[1]["loss"])


def test_off_by_default_and_set_from_yaml_or_set(tmp_path: Path) -> None:
    cfg = config_from_dict(tiny_config(tmp_path))
    assert cfg.train.own_prefix.prob == 0.0 and (cfg.train.own_prefix.prompt, cfg.train.own_prefix.frames) == (64, 256)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, **{"train.own_prefix": {"prob": 0.25}})))
    cfg = load_config(path, ["train.own_prefix.frames=16", "train.own_prefix.temp_text=0.5"])
    own = cfg.train.own_prefix
    assert (own.prob, own.prompt, own.frames, own.temp, own.temp_text) == (0.25, 64, 16, 0.8, 0.5)


@pytest.mark.parametrize("over,message", [
    ({"train.own_prefix": {"prob": 1.5}}, r"train.own_prefix.prob must be in \[0, 1\] \(0: off\), got 1.5"),
    ({"train.own_prefix": {"prob": 0.5, "prompt": 0}}, "train.own_prefix.prompt must be >= 1"),
    ({"train.own_prefix": {"frames": 0}}, "train.own_prefix.frames must be >= 1"),
    ({"train.own_prefix": {"temp_text": 0.0}}, "train.own_prefix.temp_text must be > 0"),
    ({"train.own_prefix": {"every": 0}}, r"train.own_prefix.every must be >= 1 \(1: every step\), got 0"),
    ({"train.own_prefix": {"prob": 0.5}, "train.parallel": "fsdp"}, "use train.parallel: ddp"),
    ({"train.own_prefix": {"prob": 0.5}, "model.family": "hf"}, "train.own_prefix is Moshi-only"),
    ({"train.own_prefix": {"distill": -1.0}}, r"train.own_prefix.distill must be >= 0 \(0: own frames unscored\)"),
    ({"train.own_prefix": {"prob": 0.5, "distill": 1.0}, "model.branch": "ttt"},
     "train.own_prefix.distill needs model.branch: inplace"),
])
def test_config_errors_name_the_field_and_the_fix(tmp_path: Path, over: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config_from_dict(tiny_config(tmp_path, **over))


def test_a_stage_too_short_for_prompt_and_frames_fails_before_step_one(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"stage 0: seq_len 24 leaves no real frame after train.own_prefix's "
                                         r"prompt \+ frames \+ the model's acoustic delay \(24\)"):
        trainer(tmp_path, OWN | {"frames": 19})


@pytest.mark.gpu
@pytest.mark.parametrize("branch,memory,dtype", [("ttt", {"gate_init": 0.5, "mini_batch": 4}, "auto"),
                                                ("inplace", {"chunk": 4, "decay": 0.9}, "float32")])
def test_own_prefixes_train_on_cuda_in_bf16(tmp_path: Path, branch: str, memory: dict, dtype: str) -> None:
    """The device path: moshi's LMGen (CUDA-graphed unless NO_CUDA_GRAPH is set) samples inside the bf16
    training loop, twice (every 2nd of 4 steps), and the run's losses stay finite; with bf16 weights and with
    float32 ones under autocast (issue 24's arms)."""
    t = trainer(tmp_path, OWN | {"every": 2}, **{
        "model.branch": branch, "model.memory": memory, "model.dtype": dtype, "train.device": "cuda",
        "train.precision": "bf16", "train.batch_size": 4, "stages": [{"seq_len": T, "steps": 4, "lr": 1e-3}]})
    assert t.run().finished
    train = [r for r in read_metrics(t.cfg.run_dir) if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in train)
    assert train[0]["own_prefix_s"] > 0 and train[2]["own_prefix_s"] > 0  # steps 0 and 2 sampled


def test_own_prefixes_sample_under_bf16_autocast_with_float32_weights(tmp_path: Path) -> None:
    """model.dtype float32 with train.precision bf16 (recipes/evidence24/arms.yaml): moshi makes its KV caches
    in the weights' float32 while autocast projects keys and values to bf16, and its ring cache's `scatter_`
    failed ("Expected self.dtype to be equal to src.dtype"). CPU autocast takes the same path as CUDA's."""
    t = trainer(tmp_path, OWN, **{"model.branch": "inplace", "model.memory": {"chunk": 4, "decay": 0.9},
                                  "model.layers": "all"})
    assert t.seg.model.transformer.layers[0].self_attn.in_projs[0].weight.dtype == torch.float32
    t.own_prefix.bf16 = True  # the trainer turns bf16 on for CUDA only: the CPU autocast stands in for it
    codes = t.train_data.batch(0, 2, T, 0)
    out, scored = t.own_prefix(codes, 0, 0, 0)
    assert torch.equal(out[..., :P], codes[..., :P]) and (~scored).sum() == 2 * F


DISTILL = {"model.branch": "inplace", "model.memory": {"chunk": 4, "decay": 0.9}, "model.layers": "all"}


def distill_trainer(tmp: Path, written: bool) -> tuple[Trainer, torch.Tensor, torch.Tensor]:
    """An in-place tiny Moshi with own prefixes and `distill`, its memory writing (`written`: target projections
    drawn at std 1) or not (the initial zero projections); a batch of own-prefix sequences and its `scored`."""
    t = trainer(tmp, OWN | {"distill": 2.0}, **DISTILL)
    layers = [m for m in t.seg.model.modules() if isinstance(m, InPlaceLayer)]
    assert layers and all(m.target_proj.weight.abs().max() == 0 for m in layers)
    if written:
        torch.manual_seed(3)
        with torch.no_grad():
            for m in layers:
                m.target_proj.weight.normal_(std=1.0)
    codes, scored = t.own_prefix(t.train_data.batch(0, 2, T, 0), 0, 0, 0)
    return t, codes, scored


def test_distill_scores_the_own_frames_by_kl_to_the_model_frozen_after_the_prompt(tmp_path: Path) -> None:
    """Soft targets: the own frames' usual weights times `distill`, scored by KL(teacher || model), the teacher
    the model whose memory writes nothing after the prompt (positions > P: position t reads frame t - 1); the
    real frames' cross-entropy unchanged; each term normalised by real + soft weight. The teacher runs segment by
    segment (12 frames) with its own carry, the hand computation in one forward."""
    t, codes, scored = distill_trainer(tmp_path, written=True)
    seg = t.seg
    plain = seg.prepare(codes, scored)
    soft = (seg.prepare(codes).weights - plain.weights) * 2.0
    assert soft.sum() > 0 and ((soft > 0) & (plain.weights > 0)).sum() == 0  # own targets only
    with torch.no_grad():
        ce = t._run_sequence(seg, plain, 12, None)
        both = t._run_sequence(seg, replace(plain, soft_weights=soft), 12, None)
        student, _ = seg.segment_logits(plain)
        with writes_scaled(seg.model, (torch.arange(T) <= P).float()):
            teacher, _ = seg.segment_logits(plain)
        with writes_scaled(seg.model, 0.0):  # writes off from the start: another teacher, other numbers
            off, _ = seg.segment_logits(plain)
    want = []
    for s, tl, (a, b) in zip(student, teacher, seg.terms.values()):
        w = soft[:, a:b]
        kl = torch.nn.functional.kl_div(s[w > 0].log_softmax(-1), tl[w > 0].log_softmax(-1), log_target=True,
                                        reduction="none")
        want.append(float((kl.sum(-1) * w[w > 0]).sum()))
    got = (both - ce).tolist()
    assert got == pytest.approx(want, rel=1e-4) and min(want) > 1e-3  # the writes move the own frames' predictions
    assert (off[0] - teacher[0]).abs().nan_to_num().max() > 1e-3  # the prompt's writes matter to the teacher
    assert torch.equal(seg.term_weights(replace(plain, soft_weights=soft)), seg.term_weights(plain) + torch.stack(
        [soft[:, a:b].sum() for a, b in seg.terms.values()]))


def test_distill_adds_nothing_while_the_memory_writes_nothing(tmp_path: Path) -> None:
    """Zero target projections write nothing, so the model is its own teacher: the KL is 0 and the gradient
    the teacher-forced one; a short run trains with finite losses."""
    t, codes, scored = distill_trainer(tmp_path, written=False)
    plain = t.seg.prepare(codes, scored)
    soft = (t.seg.prepare(codes).weights - plain.weights) * 2.0
    with torch.no_grad():
        both = t._run_sequence(t.seg, replace(plain, soft_weights=soft), 12, None)
        diff = both - t._run_sequence(t.seg, plain, 12, None)
    assert diff.abs().max() < 1e-4
    run = trainer(tmp_path / "run2", OWN | {"distill": 1.0, "prob": 0.5}, **DISTILL, **{
        "train.batch_size": 4, "stages": [{"seq_len": T, "steps": 2, "lr": 1e-3}]})
    assert run.run().finished
    assert all(math.isfinite(r["loss"]) for r in read_metrics(run.cfg.run_dir) if r["split"] == "train")
