"""The trainer: stages of growing sequence length, segments carrying TTT state, checkpoints that survive kills.

One process or `torchrun --nproc-per-node N` (DDP or FSDP2 `fully_shard`, on PyTorch's own engine).
Per optimizer step, each process takes its share of the global batch; a sequence is run in
segments (TTT state and attention window carried, detached in between) with a backward per
segment, gradients synchronised on the last one. Loss terms are normalised by their total weight
over the whole global batch, so N processes compute the same loss and gradients as one process
with the same global batch.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn

from ttt_speech.layers.ttt import TTTLayer
from ttt_speech.train.checkpoint import (
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    load_trainable,
    remove_partial,
    save_checkpoint,
)
from ttt_speech.train.config import Config, Stage
from ttt_speech.train.data import BadInputError, SkipLog, TokenData, check_streams, find_documents, split_by_source
from ttt_speech.train.metrics import Metrics
from ttt_speech.train.model import Batch, Carry, SegmentLM
from ttt_speech.train.parallel import full, parallelize, start_processes, sync_gradients
from ttt_speech.train.trainable import add_lora, merge_lora, set_trainable

log = logging.getLogger("ttt_speech.train")

EXPORT_DIR = "export"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- building -------------------------------------------------------------------------------------
def build_segment_lm(cfg: Config, device: torch.device, dtype: torch.dtype) -> SegmentLM:
    """The model of `cfg`, wrapped for segment training, with LoRA and requires_grad as configured."""
    m, t = cfg.model, cfg.train
    if m.family == "moshi":
        from ttt_speech.train.moshi_model import MoshiSegmentLM, load_moshi

        seg: SegmentLM = MoshiSegmentLM(load_moshi(m, device, dtype), t.attention_window, t.attention_chunk,
                                        t.grad_checkpointing, cfg.loss)
    else:
        from ttt_speech.train.hf_model import HFSegmentLM, load_hf

        seg = HFSegmentLM(load_hf(m, t.attention_window, device, dtype), t.attention_window, t.attention_chunk,
                          t.grad_checkpointing)
    if t.trainable == "lora":
        torch.manual_seed(m.seed)
        add_lora(seg.layers(), t.lora)
    set_trainable(seg, t.trainable)
    return seg


def lr_at(stages: list[Stage], step: int) -> float:
    """Learning rate of global step `step`: per stage, linear warmup then cosine down to min_lr_ratio * lr."""
    for stage in stages:
        if step < stage.steps:
            break
        step -= stage.steps
    else:
        stage, step = stages[-1], stages[-1].steps - 1
    warm = math.ceil(stage.warmup * stage.steps)
    if step < warm:
        return stage.lr * (step + 1) / warm
    progress = (step - warm) / max(1, stage.steps - warm)
    return stage.lr * (stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def segment_bounds(length: int, segment: int | None) -> list[tuple[int, int]]:
    step = segment or length
    return [(s, min(s + step, length)) for s in range(0, length, step)]


# -- the trainer ----------------------------------------------------------------------------------
def kernel_mini_batches(model: nn.Module) -> set[int]:
    """Mini-batch sizes of the model's TTT-Linear layers, which train through a kernel on CUDA (FLA's or ours)."""
    return {m.config.mini_batch for m in model.modules() if isinstance(m, TTTLayer) and m.config.inner == "linear"}


@dataclass
class RunResult:
    state: TrainState
    finished: bool
    checkpoint: Path | None
    export: Path | None
    skipped: int


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.procs = start_processes(cfg.train.device)
        p = self.procs
        if cfg.train.batch_size % p.world:
            raise ValueError(f"train.batch_size={cfg.train.batch_size} (global) must be a multiple of the "
                             f"{p.world} processes")
        self.local_batch = cfg.train.batch_size // p.world
        self.bf16 = p.device.type == "cuda" and cfg.train.precision == "bf16"
        self.dtype = DTYPES[cfg.model.dtype] if cfg.model.dtype != "auto" else (
            torch.bfloat16 if p.device.type == "cuda" else torch.float32)
        self.skips = SkipLog(cfg.data.skip_bad)
        train_docs = find_documents(cfg.data.train, self.skips)  # every file checked before the model loads
        val_docs = find_documents(cfg.data.eval, self.skips) if cfg.data.eval else []

        torch.manual_seed(cfg.seed)
        self.seg = build_segment_lm(cfg, p.device, self.dtype).train()
        self.trainable = [n for n, q in self.seg.named_parameters() if q.requires_grad]
        what = f"this {cfg.model.family} model"
        train_docs = check_streams(train_docs, self.seg.streams, what, self.skips)
        val_docs = check_streams(val_docs, self.seg.streams, what, self.skips)
        if not cfg.data.eval:
            train_docs, val_docs = split_by_source(train_docs, cfg.data.val_fraction)
        if not train_docs:
            raise BadInputError(f"no usable training documents in {cfg.data.train}")
        self.train_data = TokenData(train_docs, self.seg.streams, cfg.seed, cfg.data.pack, cfg.data.min_chunk,
                                    cfg.data.repeat)
        self.val_data = TokenData(val_docs, self.seg.streams, cfg.seed, cfg.data.pack, cfg.data.min_chunk) \
            if val_docs else None
        for i, stage in enumerate(cfg.stages):  # before step 1, not when the stage comes
            self.train_data.check_length(stage.seq_len, f"stage {i}, training data {cfg.data.train}")

        self.model = parallelize(self.seg, p, cfg.train.parallel, self.bf16)
        params = [q for q in self.seg.parameters() if q.requires_grad]
        decay = [q for q in params if q.dim() >= 2]
        no_decay = [q for q in params if q.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=1.0, betas=cfg.train.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_at(cfg.stages, s))
        self.params = params
        self.stop_requested = False
        if p.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_partial(self.run_dir)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        p.barrier()
        self.metrics = Metrics(self.run_dir, cfg.log.tensorboard) if p.main else None
        n_train = sum(q.numel() for q in params)
        log.info("model: %s (%d TTT layers), %.3fM trainable parameters (%s), window %d, %d process(es) [%s], %s",
                 cfg.model.family, self.seg.ttt_layer_count(), n_train / 1e6, cfg.train.trainable, self.seg.window,
                 p.world, type(self.model).__name__, p.device)
        log.info("data: %d training documents, %d validation documents", len(train_docs), len(val_docs))

    # -- one step ---------------------------------------------------------------------------------
    def _run_sequence(self, model: nn.Module, batch: Batch, segment: int | None, backward_scale: Tensor | None
                      ) -> Tensor:
        """Forward (and backward when `backward_scale` is given) over all segments; the loss sums per term."""
        sums = torch.zeros(len(self.seg.terms), device=self.procs.device)
        carry: Carry | None = None
        bounds = segment_bounds(batch.length, segment)
        for i, (a, b) in enumerate(bounds):
            with sync_gradients(model, i == len(bounds) - 1), torch.autocast(self.procs.device.type, torch.bfloat16,
                                                                    enabled=self.bf16):
                part, carry = model(batch.segment(a, b), carry)
                if backward_scale is not None:
                    (part * backward_scale).sum().backward()
            sums += part.detach().float()
        return sums

    def _totals(self, batch: Batch) -> Tensor:
        return self.procs.all_reduce(self.seg.term_weights(batch).to(self.procs.device))

    def train_step(self, codes: Tensor, segment: int | None) -> dict[str, float]:
        batch = self.seg.prepare(codes.to(self.procs.device))
        totals = self._totals(batch)
        # DDP and FSDP average gradients over processes: undo it, each process already holds its share
        scale = torch.where(totals > 0, self.procs.world / totals.clamp_min(1e-12), torch.zeros_like(totals))
        sums = self._run_sequence(self.model, batch, segment, scale)
        grad_norm = full(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self._losses(self.procs.all_reduce(sums), totals) | {"lr": lr, "grad_norm": float(grad_norm)}

    def _losses(self, sums: Tensor, totals: Tensor) -> dict[str, float]:
        per = torch.where(totals > 0, sums / totals.clamp_min(1e-12), torch.zeros_like(sums))
        return {"loss": float(per.sum())} | {f"loss_{n}": float(v) for n, v in zip(self.seg.terms, per)}

    @torch.no_grad()
    def evaluate(self, stage: Stage) -> dict[str, float] | None:
        """Loss on the held-out files at this stage's length (same count of forwards on every process)."""
        if self.val_data is None or self.val_data.num_chunks(stage.seq_len) == 0:
            return None
        g = self.cfg.train.batch_size
        n = min(self.cfg.log.eval_batches, math.ceil(self.val_data.num_chunks(stage.seq_len) / g))
        sums = torch.zeros(len(self.seg.terms), device=self.procs.device)
        totals = torch.zeros_like(sums)
        self.seg.eval()
        for b in range(n):
            codes = self.val_data.eval_batch(b * g + self.procs.rank * self.local_batch, self.local_batch, stage.seq_len)
            batch = self.seg.prepare(codes.to(self.procs.device))
            totals += self.seg.term_weights(batch).to(self.procs.device)
            sums += self._run_sequence(self.seg, batch, stage.segment_len or self.cfg.train.segment_len, None)
        self.seg.train()
        return self._losses(self.procs.all_reduce(sums), self.procs.all_reduce(totals))

    # -- run --------------------------------------------------------------------------------------
    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.stop_requested = True

    def _stop(self) -> bool:
        flag = torch.tensor([float(self.stop_requested)], device=self.procs.device)
        return bool(self.procs.all_reduce(flag, dist.ReduceOp.MAX).item())

    def _checkpoint(self, state: TrainState) -> Path:
        path = save_checkpoint(self.run_dir, state, self.model, self.optimizer, self.scheduler, self.procs.rank,
                               self.procs.world, self.procs.barrier, self.cfg.checkpoint.keep)
        log.info("checkpoint %s", path)
        return path

    def _log(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.log(record)

    def _resume(self) -> TrainState:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            return TrainState()
        state = load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.trainable, self.procs.rank)
        if self.metrics is not None:
            self.metrics.truncate_after(state.step)
        log.info("resumed from %s: step %d, stage %d step %d", path, state.step, state.stage, state.stage_step)
        return state

    def run(self) -> RunResult:
        cfg, p = self.cfg, self.procs
        state = self._resume()
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        from tqdm import tqdm

        bar = tqdm(total=cfg.total_steps, initial=state.step, unit="step", dynamic_ncols=True, file=sys.stderr,
                   disable=not (p.main and cfg.log.progress), mininterval=0.5)
        last_ckpt: Path | None = latest_checkpoint(self.run_dir)
        stopped = False
        try:
            while state.stage < len(cfg.stages) and not stopped:
                stage = cfg.stages[state.stage]
                segment = stage.segment_len or cfg.train.segment_len
                if stage.seq_len <= self.seg.window and self.seg.ttt_layer_count():
                    warnings.warn(f"stage {state.stage}: sequences of {stage.seq_len} steps are no longer than the "
                                  f"attention window ({self.seg.window}): attention sees everything, so TTT is never "
                                  f"needed and learns nothing about memory; lengthen the stage or set "
                                  f"train.attention_window below {stage.seq_len}", stacklevel=1)
                misaligned = sorted(k for k in kernel_mini_batches(self.model) if segment and segment % k)
                if misaligned:
                    warnings.warn(f"stage {state.stage}: segments of {segment} steps are not a multiple of the TTT "
                                  f"mini-batch ({misaligned[0]}): every segment after the first starts mid-mini-batch, "
                                  f"where the TTT kernels cannot start, so on CUDA they run the PyTorch reference "
                                  f"(6x to 100x slower on an H100); use a multiple of {misaligned[0]}", stacklevel=1)
                while not stopped and state.stage_step < stage.steps:
                    t0 = time.perf_counter()
                    codes = self.train_data.batch(state.samples + p.rank * self.local_batch, self.local_batch,
                                                  stage.seq_len, state.stage)
                    out = self.train_step(codes, segment)
                    state.step += 1
                    state.stage_step += 1
                    state.samples += cfg.train.batch_size
                    dt = time.perf_counter() - t0
                    tokens = cfg.train.batch_size * stage.seq_len
                    record = {"step": state.step, "stage": state.stage, "stage_step": state.stage_step,
                              "split": "train", "seq_len": stage.seq_len, **out, "tokens": tokens,
                              "tokens_per_s": tokens / dt, "time": time.time()}
                    if p.device.type == "cuda":  # shows whether memory stays linear as the stages lengthen
                        record["max_memory_gib"] = torch.cuda.max_memory_allocated(p.device) / 2**30
                    if state.step % cfg.log.every == 0 or state.stage_step == stage.steps:
                        self._log(record)
                    bar.set_postfix(stage=state.stage, loss=f"{out['loss']:.4f}", tok_s=f"{tokens / dt:,.0f}",
                                    refresh=False)
                    bar.update(1)
                    stage_done = state.stage_step == stage.steps
                    if cfg.log.eval_every and state.step % cfg.log.eval_every == 0 or stage_done:
                        val = self.evaluate(stage)
                        if val is not None:
                            self._log({"step": state.step, "stage": state.stage, "split": "val",
                                       "seq_len": stage.seq_len, **val})
                            log.info("step %d val loss %.4f", state.step, val["loss"])
                    if stage_done:
                        state = TrainState(state.step, state.stage + 1, 0, 0)
                    stopped = self._stop()
                    if stopped or stage_done or state.step % cfg.checkpoint.every == 0:
                        last_ckpt = self._checkpoint(state)
                    if stopped:
                        log.warning("SIGTERM: stopped at step %d, checkpoint %s", state.step, last_ckpt)
                    if stage_done:
                        break
        finally:
            signal.signal(signal.SIGTERM, previous)
            bar.close()
        finished = state.stage >= len(cfg.stages)
        export = None
        if finished and last_ckpt is not None:
            export = self.run_dir / EXPORT_DIR
            if p.main:
                export_checkpoint(cfg, last_ckpt, export, self.dtype)
            p.barrier()
        if self.skips.skipped:
            log.warning(self.skips.summary())
        if self.metrics is not None:
            self.metrics.close()
        return RunResult(state, finished, last_ckpt, export, len(self.skips.skipped))


def export_checkpoint(cfg: Config, checkpoint: Path, out_dir: Path, dtype: torch.dtype) -> Path:
    """An inference checkpoint (the integration's own format, LoRA merged) from a training checkpoint.

    The base model is rebuilt on the CPU in `dtype` from the config (frozen weights are the base's)
    and the checkpoint's trainable parameters are loaded over it, so this works the same after DDP
    or FSDP, whose processes each hold only part of the model.
    """
    torch.manual_seed(cfg.seed)
    seg = build_segment_lm(cfg, torch.device("cpu"), dtype)
    trained = load_trainable(checkpoint)
    missing = sorted({n for n, q in seg.named_parameters() if q.requires_grad} - set(trained))
    if missing:
        raise ValueError(f"{checkpoint}: lacks trainable parameters {missing[:5]}")
    with torch.no_grad():
        params = dict(seg.named_parameters())
        for name, value in trained.items():
            params[name].copy_(value)
    merge_lora(seg.model)
    out_dir.mkdir(parents=True, exist_ok=True)
    seg.export(str(out_dir))
    source = cfg.model.hybrid or cfg.model.pretrained
    if cfg.model.family == "moshi" and source and Path(source).is_dir():
        from ttt_speech.moshi.checkpoint import copy_companions

        copy_companions(source, out_dir)
    log.info("exported %s -> %s", checkpoint, out_dir)
    return out_dir


def setup_logging(run_dir: Path, main: bool) -> None:
    """INFO to stderr and RUN_DIR/train.log on the main process, warnings only elsewhere."""
    level = logging.INFO if main else logging.WARNING
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers,
                        force=True)
    logging.captureWarnings(True)


def train(cfg: Config) -> RunResult:
    """Run (or resume) the training described by `cfg`."""
    setup_logging(Path(cfg.run_dir), int(os.environ.get("RANK", "0")) == 0)
    try:
        result = Trainer(cfg).run()
        if dist.is_initialized():
            dist.barrier()  # gloo aborts when a process exits while another still talks to it
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
