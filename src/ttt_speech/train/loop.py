"""The trainer: stages of growing sequence length, segments carrying memory state, checkpoints that survive kills.

One process or `torchrun --nproc-per-node N` (DDP or FSDP2 `fully_shard`, on PyTorch's own engine).
Per optimizer step, each process takes its share of the global batch; a sequence is run in
segments (memory state and attention window carried, detached in between) with a backward per
segment, gradients synchronised on the last one. Loss terms are normalised by their total weight
over the whole global batch, so N processes compute the same loss and gradients as one process
with the same global batch.
"""

from __future__ import annotations

import logging
import math
import os
import time
import typing as tp
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn

from ttt_speech.engine.checkpoint import TrainState, latest_checkpoint, load_trainable
from ttt_speech.engine.config import Stage
from ttt_speech.engine.loop import EXPORT_DIR, RunResult, StagedTrainer, adamw, prepare_run_dir, setup_logging
from ttt_speech.engine.metrics import Metrics
from ttt_speech.engine.skips import BadInputError, SkipLog
from ttt_speech.errors import UsageError
from ttt_speech.layers.inplace import writes_scaled
from ttt_speech.layers.ttt import TTTLayer
from ttt_speech.train.config import Config
from ttt_speech.train.data import TokenData, check_streams, find_documents, split_by_source
from ttt_speech.train.model import Batch, Carry, SegmentLM
from ttt_speech.train.parallel import full, parallelize, start_processes, sync_gradients
from ttt_speech.train.trainable import add_lora, is_memory, merge_lora, set_trainable

if tp.TYPE_CHECKING:
    from ttt_speech.train.own_prefix import OwnPrefix

log = logging.getLogger("ttt_speech.train")

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


def own_prefix(cfg: Config, seg: SegmentLM, bf16: bool) -> OwnPrefix | None:
    """`train.own_prefix` (None when off) on the module the loop trains (the model, not its DDP wrapper)."""
    if not cfg.train.own_prefix.prob:
        return None
    from ttt_speech.train.own_prefix import OwnPrefix

    return OwnPrefix(cfg.train.own_prefix, seg.model, cfg.seed, bf16)


def segment_bounds(length: int, segment: int | None) -> list[tuple[int, int]]:
    step = segment or length
    return [(s, min(s + step, length)) for s in range(0, length, step)]


# -- the trainer ----------------------------------------------------------------------------------
def kernel_mini_batches(model: nn.Module) -> set[int]:
    """Mini-batch sizes of the model's TTT-Linear layers, which train through a kernel on CUDA (FLA's or ours)."""
    return {m.config.mini_batch for m in model.modules() if isinstance(m, TTTLayer) and m.config.inner == "linear"}


def check_resumed_branch(run_dir: Path, cfg: Config) -> None:
    """A run resumed with another memory branch than it started with stops with one line. The default branch
    became in-place (issue 23), so an old config that names none would otherwise rebuild the model with
    another branch and fail on the checkpoint's parameter names."""
    saved = run_dir / "config.yaml"
    if cfg.model.hybrid or cfg.model.layers == [] or latest_checkpoint(run_dir) is None or not saved.exists():
        return
    started = (yaml.safe_load(saved.read_text()) or {}).get("model", {})
    branch = started.get("branch", "ttt")
    if started.get("layers") != [] and branch != cfg.model.branch:
        raise UsageError(f"{run_dir} was started with model.branch {branch}, this config builds "
                         f"{cfg.model.branch} (the default since issue 23): add model.branch: {branch} "
                         f"(or --set model.branch={branch}) to resume it")


class Trainer(StagedTrainer):
    """The LM trainer: a step is one global batch, each sequence run in segments carrying state."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        check_resumed_branch(self.run_dir, cfg)
        self.procs = start_processes(cfg.train.device)
        p = self.procs
        if cfg.train.batch_size % p.world:
            raise ValueError(f"train.batch_size={cfg.train.batch_size} (global) must be a multiple of the "
                             f"{p.world} processes")
        self.local_batch = cfg.train.batch_size // p.world
        self.bf16 = p.device.type == "cuda" and cfg.train.precision == "bf16"
        if p.device.type == "cuda":
            # cuDNN's fused attention backward failed on an H200 (torch 2.11: `mha_graph.execute(...)
            # .is_good()`) for the depformer's attention over batch x frames rows; flash/efficient are fine
            torch.backends.cuda.enable_cudnn_sdp(False)
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
        self.own_prefix = own_prefix(cfg, self.seg, self.bf16)
        for i, stage in enumerate(cfg.stages):  # before step 1, not when the stage comes
            self.train_data.check_length(stage.seq_len, f"stage {i}, training data {cfg.data.train}")
            if self.own_prefix is not None:
                self.own_prefix.check_length(stage.seq_len, f"stage {i}")

        self.model = parallelize(self.seg, p, cfg.train.parallel, self.bf16)
        named = [(n, q) for n, q in self.seg.named_parameters() if q.requires_grad]
        params = [q for _, q in named]
        groups = [{"params": [q for n, q in named if is_memory(n) == memory and (q.dim() >= 2) == decay],
                   "weight_decay": cfg.train.weight_decay if decay else 0.0,
                   "lr": cfg.train.memory_lr_scale if memory else 1.0}
                  for memory in (False, True) for decay in (True, False)]
        self.optimizer, self.scheduler = adamw(groups, cfg.train.betas, cfg.stages)
        self.params = params
        self.stages, self.checkpoint_config, self.log_config = cfg.stages, cfg.checkpoint, cfg.log
        self.global_batch, self.device, self.checkpoint_keys = cfg.train.batch_size, p.device, self.trainable
        self.rank, self.world = p.rank, p.world
        if p.main:
            prepare_run_dir(self.run_dir, cfg.to_dict())
        p.barrier()
        self.metrics = Metrics(self.run_dir, cfg.log.tensorboard) if p.main else None
        n_train = sum(q.numel() for q in params)
        log.info("model: %s (%d memory layers), %.3fM trainable parameters (%s), window %d, %d process(es) [%s], %s",
                 cfg.model.family, self.seg.memory_layer_count(), n_train / 1e6, cfg.train.trainable, self.seg.window,
                 p.world, type(self.model).__name__, p.device)
        log.info("data: %d training documents, %d validation documents", len(train_docs), len(val_docs))

    # -- one step ---------------------------------------------------------------------------------
    def _run_sequence(self, model: nn.Module, batch: Batch, segment: int | None, backward_scale: Tensor | None
                      ) -> Tensor:
        """Forward (and backward when `backward_scale` is given) over all segments; the loss sums per term.
        A batch with soft targets first runs each segment through the teacher: the same model with its memory
        frozen after the own-prefix prompt (`train.own_prefix.distill`), no gradient, its own carry."""
        sums = torch.zeros(len(self.seg.terms), device=self.procs.device)
        carry: Carry | None = None
        teacher: Carry | None = None
        bounds = segment_bounds(batch.length, segment)
        for i, (a, b) in enumerate(bounds):
            with sync_gradients(model, i == len(bounds) - 1), torch.autocast(self.procs.device.type, torch.bfloat16,
                                                                    enabled=self.bf16):
                part_batch = batch.segment(a, b)
                if part_batch.soft_weights is not None:
                    # Moshi's position t reads frame t - 1: the prompt's frames are written through position `prompt`
                    frozen = (torch.arange(a, b, device=self.procs.device) <= self.cfg.train.own_prefix.prompt).float()
                    with torch.no_grad(), writes_scaled(self.seg.model, frozen):
                        logits, teacher = self.seg.segment_logits(part_batch, teacher)
                    part_batch = replace(part_batch, teacher=logits)
                part, carry = model(part_batch, carry)
                if backward_scale is not None:
                    (part * backward_scale).sum().backward()
            sums += part.detach().float()
        return sums

    def _totals(self, batch: Batch) -> Tensor:
        return self.procs.all_reduce(self.seg.term_weights(batch).to(self.procs.device))

    def train_step(self, codes: Tensor, segment: int | None, scored: Tensor | None = None,
                   distill: float = 0.0) -> dict[str, float]:
        """One optimizer step. `scored` [B, T]: the frames that are targets (None: all); with `distill`, the
        others are scored against the teacher (`train.own_prefix.distill`), `distill` times their usual weight."""
        codes = codes.to(self.procs.device)
        batch = self.seg.prepare(codes, scored)
        if distill and scored is not None and not scored.all():
            batch = replace(batch, soft_weights=(self.seg.prepare(codes).weights - batch.weights) * distill)
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

    # -- what the engine asks ---------------------------------------------------------------------
    def step(self, batch: Tensor, state: TrainState, stage: Stage) -> dict[str, float]:
        segment = stage.segment_len or self.cfg.train.segment_len
        if self.own_prefix is None:
            return self.train_step(batch, segment)
        start = time.perf_counter()  # generation is sequential, one frame per step: worth watching
        codes, scored = self.own_prefix(batch.to(self.procs.device), state.stage, self._first(state), state.step)
        if self.procs.device.type == "cuda":
            torch.cuda.synchronize(self.procs.device)
        seconds = time.perf_counter() - start
        return self.train_step(codes, segment, scored, self.cfg.train.own_prefix.distill) | {"own_prefix_s": seconds}

    def _first(self, state: TrainState) -> int:
        """The stage's index of this process's first sample in the step."""
        return state.samples + self.procs.rank * self.local_batch

    def batches(self, state: TrainState, stage: Stage) -> tp.Iterator[Tensor]:
        for _ in range(stage.steps - state.stage_step):  # state.samples moves on with each step
            yield self.train_data.batch(self._first(state), self.local_batch, stage.seq_len, state.stage)

    def throughput(self, stage: Stage, seconds: float) -> dict[str, float]:
        tokens = self.cfg.train.batch_size * stage.seq_len
        return {"tokens": tokens, "tokens_per_s": tokens / seconds}

    def progress(self, out: dict[str, float], state: TrainState, throughput: dict[str, float]) -> dict[str, str]:
        own = {"own_s": f"{out['own_prefix_s']:.1f}"} if "own_prefix_s" in out else {}
        return {"stage": str(state.stage), "loss": f"{out['loss']:.4f}",
                "tok_s": f"{throughput['tokens_per_s']:,.0f}"} | own

    def begin_stage(self, state: TrainState, stage: Stage) -> None:
        segment = stage.segment_len or self.cfg.train.segment_len
        if stage.seq_len <= self.seg.window and self.seg.memory_layer_count():
            warnings.warn(f"stage {state.stage}: sequences of {stage.seq_len} steps are no longer than the "
                          f"attention window ({self.seg.window}): attention sees everything, so the memory is never"
                          f" needed and learns nothing; lengthen the stage or set "
                          f"train.attention_window below {stage.seq_len}", stacklevel=1)
        misaligned = sorted(k for k in kernel_mini_batches(self.model) if segment and segment % k)
        if misaligned:
            warnings.warn(f"stage {state.stage}: segments of {segment} steps are not a multiple of the TTT "
                          f"mini-batch ({misaligned[0]}): every segment after the first starts mid-mini-batch, "
                          f"where the TTT kernels cannot start, so on CUDA they run the PyTorch reference "
                          f"(6x to 100x slower on an H100); use a multiple of {misaligned[0]}", stacklevel=1)

    def barrier(self) -> None:
        self.procs.barrier()

    def stop_everywhere(self) -> bool:
        flag = torch.tensor([float(self.stop_requested)], device=self.procs.device)
        return bool(self.procs.all_reduce(flag, dist.ReduceOp.MAX).item())

    def export(self, checkpoint: Path) -> Path:
        out = self.run_dir / EXPORT_DIR
        if self.procs.main:
            export_checkpoint(self.cfg, checkpoint, out, self.dtype)
        self.procs.barrier()
        return out


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
        from ttt_speech.moshi.files import copy_companions

        copy_companions(source, out_dir)
    log.info("exported %s -> %s", checkpoint, out_dir)
    return out_dir


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
