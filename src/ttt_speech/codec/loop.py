"""The codec trainer: one process, random crops, stages of crop lengths, checkpoints that survive kills.

It reuses the LM trainer's pieces: its `Stage` schedule (`lr_at`: warmup then cosine per stage), its
atomic checkpoints (train.checkpoint: the whole Mimi state dict, EMA codebooks included, optimizer,
scheduler, RNG states) and metrics.jsonl. A resumed run repeats the loss curve of an uninterrupted
one step for step on the CPU: crops, quantizer dropout and dead-code checks are functions of the
step, and what else draws random numbers (k-means init, code replacement) uses the saved RNG.
At the end the codec is exported to RUN_DIR/export in moshi's released Mimi format.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ttt_speech.codec.config import FRAME_RATE, FRAME_SIZE, CodecConfig
from ttt_speech.codec.data import Crops, crop_batches, find_audio
from ttt_speech.codec.losses import ReconstructionLoss, si_snr
from ttt_speech.codec.model import build_codec, codec_forward, export_codec, set_quantizer_step, size_report
from ttt_speech.train.checkpoint import (
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    load_trainable,
    remove_partial,
    save_checkpoint,
)
from ttt_speech.train.config import Stage
from ttt_speech.train.data import SkipLog
from ttt_speech.train.loop import EXPORT_DIR, lr_at, setup_logging
from ttt_speech.train.metrics import Metrics

log = logging.getLogger("ttt_speech.codec")

VAL_SEED = 1 << 30  # validation crops come from their own stream of seeds
LOSS_TERMS = ("wave_l1", "mel_l1", "mel_l2", "commitment")


@dataclass
class CodecRunResult:
    state: TrainState
    finished: bool
    checkpoint: Path | None
    export: Path | None
    skipped: int


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class CodecTrainer:
    def __init__(self, cfg: CodecConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.device = pick_device(cfg.train.device)
        self.bf16 = self.device.type == "cuda" and cfg.train.precision == "bf16"
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # crops have one shape per stage
        self.skips = SkipLog(cfg.data.skip_bad)
        self.train_audio = find_audio(cfg.data.train, self.skips)  # every file checked before the model is built
        self.val_audio = find_audio(cfg.data.eval, self.skips) if cfg.data.eval else []

        self.mimi = build_codec(cfg.model, cfg.seed, self.device)
        self.loss = ReconstructionLoss(cfg.loss.mel_windows, cfg.loss.n_mels, self.mimi.sample_rate).to(self.device)
        self.weights = {k: getattr(cfg.loss, k) for k in LOSS_TERMS}
        named = [(n, q) for n, q in self.mimi.named_parameters() if q.requires_grad]
        self.params = [q for _, q in named]
        # matrices decay; biases, norms, layer scales and weight-norm gains do not
        decay = [q for n, q in named if q.dim() >= 2 and not n.endswith("weight_g")]
        no_decay = [q for n, q in named if not (q.dim() >= 2 and not n.endswith("weight_g"))]
        groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=1.0, betas=cfg.train.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_at(cfg.stages, s))
        self.state_keys = list(self.mimi.state_dict())
        self.stop_requested = False

        self.run_dir.mkdir(parents=True, exist_ok=True)
        remove_partial(self.run_dir)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.metrics = Metrics(self.run_dir, cfg.log.tensorboard)
        sizes = size_report(self.mimi)
        log.info("codec: Mimi %.2fM parameters, %.2f MB exported in fp16, %d codebooks x %d bins at %.1f Hz, %s%s",
                 sizes["params_m"], sizes["fp16_mb"], self.mimi.total_codebooks, self.mimi.cardinality,
                 self.mimi.frame_rate, self.device, " bf16" if self.bf16 else "")
        log.info("data: %d training examples (%.2f h), %d validation examples", len(self.train_audio),
                 sum(e.duration for e in self.train_audio) / 3600, len(self.val_audio))

    # -- one step ---------------------------------------------------------------------------------
    def _terms(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        out = codec_forward(self.mimi, x, self.bf16)
        terms = self.loss(x, out.audio) | {"commitment": out.commitment}
        total = sum(w * terms[k] for k, w in self.weights.items())
        return total, terms, out.metrics | {"si_snr": si_snr(x, out.audio.detach()).mean()}

    def train_step(self, x: torch.Tensor, step: int) -> dict[str, float]:
        n_q = set_quantizer_step(self.mimi, self.cfg.quantizer, self.cfg.seed, step)
        total, terms, metrics = self._terms(x.to(self.device, non_blocking=True))
        if not torch.isfinite(total):
            raise FloatingPointError(f"step {step + 1}: non-finite loss {float(total)} "
                                     f"({ {k: float(v) for k, v in terms.items()} })")
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        extra = {k: float(metrics[k]) for k in ("si_snr", "rvq_entropy", "rvq_expired") if k in metrics}
        return {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in terms.items()}, **extra, "codebooks": n_q,
                "lr": lr, "grad_norm": float(grad_norm)}

    @torch.no_grad()
    def evaluate(self, stage: Stage) -> dict[str, float] | None:
        """Losses and SI-SNR on fixed held-out crops of this stage's length, all codebooks."""
        if not self.val_audio:
            return None
        crops = Crops(self.val_audio, stage.seq_len * FRAME_SIZE, [self.cfg.seed, VAL_SEED])
        n = self.cfg.data.eval_crops
        batch = min(n, self.cfg.train.batch_size)
        self.mimi.eval()
        self.mimi.set_num_codebooks(self.mimi.total_codebooks)
        sums: dict[str, float] = {}
        seen = 0
        for x in crop_batches(crops, 0, n, batch, 0):
            total, terms, metrics = self._terms(x.to(self.device))
            values = {"loss": float(total), **{k: float(v) for k, v in terms.items()}, "si_snr": float(metrics["si_snr"])}
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v * x.shape[0]
            seen += x.shape[0]
        self.mimi.train()
        return {k: v / seen for k, v in sums.items()} if seen else None

    # -- run --------------------------------------------------------------------------------------
    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.stop_requested = True

    def _checkpoint(self, state: TrainState) -> Path:
        path = save_checkpoint(self.run_dir, state, self.mimi, self.optimizer, self.scheduler, 0, 1, lambda: None,
                               self.cfg.checkpoint.keep)
        log.info("checkpoint %s", path)
        return path

    def _resume(self) -> TrainState:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            return TrainState()
        state = load_checkpoint(path, self.mimi, self.optimizer, self.scheduler, self.state_keys, 0)
        self.metrics.truncate_after(state.step)
        log.info("resumed from %s: step %d, stage %d step %d", path, state.step, state.stage, state.stage_step)
        return state

    def _validate(self, state: TrainState, stage: Stage) -> None:
        val = self.evaluate(stage)
        if val is not None:
            self.metrics.log({"step": state.step, "stage": state.stage, "split": "val", "seq_len": stage.seq_len, **val})
            log.info("step %d val loss %.4f mel_l1 %.4f si_snr %.2f dB", state.step, val["loss"], val["mel_l1"],
                     val["si_snr"])

    def run(self) -> CodecRunResult:
        cfg = self.cfg
        state = self._resume()
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        from tqdm import tqdm

        bar = tqdm(total=cfg.total_steps, initial=state.step, unit="step", dynamic_ncols=True, file=sys.stderr,
                   disable=not cfg.log.progress, mininterval=0.5)
        last_ckpt = latest_checkpoint(self.run_dir)
        try:
            while state.stage < len(cfg.stages) and not self.stop_requested:
                stage = cfg.stages[state.stage]
                b = cfg.train.batch_size
                crops = Crops(self.train_audio, stage.seq_len * FRAME_SIZE, [cfg.seed, state.stage])
                batches = iter(crop_batches(crops, state.samples, stage.steps * b, b, cfg.data.workers))
                t0 = time.perf_counter()
                for x in batches:
                    out = self.train_step(x, state.step)
                    state.step += 1
                    state.stage_step += 1
                    state.samples += b
                    dt, t0 = time.perf_counter() - t0, time.perf_counter()
                    audio_s = b * stage.seq_len / FRAME_RATE
                    record = {"step": state.step, "stage": state.stage, "stage_step": state.stage_step,
                              "split": "train", "seq_len": stage.seq_len, **out, "audio_s_per_s": audio_s / dt,
                              "time": time.time()}
                    if self.device.type == "cuda":
                        record["max_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                    stage_done = state.stage_step == stage.steps
                    if state.step % cfg.log.every == 0 or stage_done:
                        self.metrics.log(record)
                    bar.set_postfix(loss=f"{out['loss']:.3f}", mel=f"{out['mel_l1']:.3f}",
                                    snr=f"{out['si_snr']:.1f}", audio_x=f"{audio_s / dt:,.0f}", refresh=False)
                    bar.update(1)
                    if cfg.log.eval_every and state.step % cfg.log.eval_every == 0 or stage_done:
                        self._validate(state, stage)
                    if stage_done:
                        state = TrainState(state.step, state.stage + 1, 0, 0)
                    if self.stop_requested or stage_done or state.step % cfg.checkpoint.every == 0:
                        last_ckpt = self._checkpoint(state)
                    if self.stop_requested:
                        log.warning("SIGTERM: stopped at step %d, checkpoint %s", state.step, last_ckpt)
                        break
                    t0 = time.perf_counter()
                del batches  # stops the stage's reader processes
        finally:
            signal.signal(signal.SIGTERM, previous)
            bar.close()
        finished = state.stage >= len(cfg.stages)
        export = None
        if finished and last_ckpt is not None:
            export = export_trained(cfg, last_ckpt, self.run_dir / EXPORT_DIR)
        if self.skips.skipped:
            log.warning(self.skips.summary())
        self.metrics.close()
        return CodecRunResult(state, finished, last_ckpt, export, len(self.skips.skipped))


def export_trained(cfg: CodecConfig, checkpoint: Path, out_dir: Path) -> Path:
    """The released-format Mimi of a training checkpoint (rebuilt on the CPU, weight norm folded)."""
    mimi = build_codec(cfg.model, cfg.seed)
    mimi.load_state_dict(load_trainable(checkpoint))
    export_codec(mimi.eval(), cfg.model, out_dir)
    log.info("exported %s -> %s", checkpoint, out_dir)
    return out_dir


def train_codec(cfg: CodecConfig) -> CodecRunResult:
    """Run (or resume) the codec training described by `cfg`."""
    setup_logging(Path(cfg.run_dir), True)
    return CodecTrainer(cfg).run()
