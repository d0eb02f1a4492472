"""The codec trainer: one process, random crops, stages of crop lengths, checkpoints that survive kills.

The loop is the engine's (`ttt_speech.engine`), shared with the LM trainer: the `Stage` schedule
(warmup then cosine per stage), atomic checkpoints (here the whole Mimi state dict, EMA codebooks
included, optimizer, scheduler, RNG states), SIGTERM, resume and metrics.jsonl; this says what a step is. A resumed run repeats the loss curve of an uninterrupted
one step for step on the CPU: crops, quantizer dropout and dead-code checks are functions of the
step, and what else draws random numbers (k-means init, code replacement) uses the saved RNG.
At the end the codec is exported to RUN_DIR/export in moshi's released Mimi format.
"""

from __future__ import annotations

import logging
import typing as tp
from pathlib import Path

import torch

from ttt_speech.audio import FRAME_RATE, FRAME_SIZE
from ttt_speech.codec.config import CodecConfig
from ttt_speech.codec.data import Crops, crop_batches, find_audio
from ttt_speech.codec.losses import ReconstructionLoss, si_snr
from ttt_speech.codec.model import build_codec, codec_forward, export_codec, set_quantizer_step, size_report
from ttt_speech.engine.checkpoint import TrainState, load_trainable
from ttt_speech.engine.config import Stage
from ttt_speech.engine.loop import EXPORT_DIR, RunResult, StagedTrainer, adamw, prepare_run_dir, setup_logging
from ttt_speech.engine.metrics import Metrics
from ttt_speech.engine.skips import SkipLog

log = logging.getLogger("ttt_speech.codec")

VAL_SEED = 1 << 30  # validation crops come from their own stream of seeds
LOSS_TERMS = ("wave_l1", "mel_l1", "mel_l2", "commitment")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class CodecTrainer(StagedTrainer):
    """Mimi from scratch: a step is one batch of random crops through the codec, its losses, one update."""

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
        self.optimizer, self.scheduler = adamw(groups, cfg.train.betas, cfg.stages)
        self.model, self.checkpoint_keys = self.mimi, list(self.mimi.state_dict())
        self.stages, self.checkpoint_config, self.log_config = cfg.stages, cfg.checkpoint, cfg.log
        self.global_batch = cfg.train.batch_size

        prepare_run_dir(self.run_dir, cfg.to_dict())
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

    # -- what the engine asks ---------------------------------------------------------------------
    def step(self, batch: torch.Tensor, state: TrainState, stage: Stage) -> dict[str, float]:
        return self.train_step(batch, state.step)

    def batches(self, state: TrainState, stage: Stage) -> tp.Iterator[torch.Tensor]:
        b = self.cfg.train.batch_size
        crops = Crops(self.train_audio, stage.seq_len * FRAME_SIZE, [self.cfg.seed, state.stage])
        return iter(crop_batches(crops, state.samples, stage.steps * b, b, self.cfg.data.workers))

    def throughput(self, stage: Stage, seconds: float) -> dict[str, float]:
        return {"audio_s_per_s": self.cfg.train.batch_size * stage.seq_len / FRAME_RATE / seconds}

    def progress(self, out: dict[str, float], state: TrainState, throughput: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{out['loss']:.3f}", "mel": f"{out['mel_l1']:.3f}", "snr": f"{out['si_snr']:.1f}",
                "audio_x": f"{throughput['audio_s_per_s']:,.0f}"}

    def describe(self, val: dict[str, float]) -> str:
        return f"val loss {val['loss']:.4f} mel_l1 {val['mel_l1']:.4f} si_snr {val['si_snr']:.2f} dB"

    def export(self, checkpoint: Path) -> Path:
        return export_trained(self.cfg, checkpoint, self.run_dir / EXPORT_DIR)


def export_trained(cfg: CodecConfig, checkpoint: Path, out_dir: Path) -> Path:
    """The released-format Mimi of a training checkpoint (rebuilt on the CPU, weight norm folded)."""
    mimi = build_codec(cfg.model, cfg.seed)
    mimi.load_state_dict(load_trainable(checkpoint))
    export_codec(mimi.eval(), cfg.model, out_dir)
    log.info("exported %s -> %s", checkpoint, out_dir)
    return out_dir


def train_codec(cfg: CodecConfig) -> RunResult:
    """Run (or resume) the codec training described by `cfg`."""
    setup_logging(Path(cfg.run_dir), True)
    return CodecTrainer(cfg).run()
