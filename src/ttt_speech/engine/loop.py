"""The staged training loop every trainer shares: stages, SIGTERM, atomic checkpoints, resume, metrics.

A trainer (the LM trainer, the codec trainer) subclasses `StagedTrainer` and says only what is its
own: the batches of a stage, what one optimizer step does, how to evaluate, what throughput means and
how to export the result. The engine walks the stages from where the newest checkpoint left off,
logs metrics.jsonl (truncated past the resumed step, so a resumed run's curve is the uninterrupted
one), checkpoints every `checkpoint.every` steps, at the end of each stage and on SIGTERM, and
exports once the last stage is done.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from ttt_speech.engine.checkpoint import TrainState, latest_checkpoint, load_checkpoint, remove_partial, save_checkpoint
from ttt_speech.engine.config import CheckpointConfig, LogConfig, Stage
from ttt_speech.engine.metrics import Metrics
from ttt_speech.engine.skips import SkipLog

log = logging.getLogger("ttt_speech.engine")

EXPORT_DIR = "export"  # RUN_DIR/export: the finished model in its inference format


@dataclass
class RunResult:
    state: TrainState
    finished: bool
    checkpoint: Path | None
    export: Path | None
    skipped: int  # input files skipped as unreadable (data.skip_bad)


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


def adamw(groups: list[dict[str, tp.Any]], betas: tuple[float, float],
          stages: list[Stage]) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW whose learning rate follows `lr_at` over the stages.

    `groups` are torch parameter groups ({"params", "weight_decay"}); a group's optional "lr" is a
    multiplier of the stage's rate (default 1), e.g. a new branch learning faster than the pretrained
    weights around it. Empty groups are dropped.
    """
    groups = [{"lr": 1.0} | g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=1.0, betas=betas)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(stages, s))


def prepare_run_dir(run_dir: Path, config: dict[str, tp.Any]) -> None:
    """Create RUN_DIR, drop what a kill left half written, and save the run's config beside it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_partial(run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


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


class StagedTrainer:
    """The loop; a subclass sets the attributes below in its __init__ and implements the hooks."""

    run_dir: Path
    stages: list[Stage]
    checkpoint_config: CheckpointConfig
    log_config: LogConfig
    global_batch: int  # sequences per optimizer step, over all processes
    device: torch.device
    model: nn.Module  # what is checkpointed (a DDP/FSDP wrapper, or the module itself)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    checkpoint_keys: list[str]  # the model's state-dict names a checkpoint holds
    metrics: Metrics | None  # None on processes other than the main one
    skips: SkipLog  # the input files skipped so far
    rank: int = 0
    world: int = 1
    stop_requested: bool = False

    # -- what a trainer says ----------------------------------------------------------------------
    def batches(self, state: TrainState, stage: Stage) -> tp.Iterator[tp.Any]:
        """The rest of this stage's batches, from the position `state` records."""
        raise NotImplementedError

    def step(self, batch: tp.Any, state: TrainState, stage: Stage) -> dict[str, float]:
        """What a step is: one optimizer step on `batch` (state.step: steps done before it); its losses etc."""
        raise NotImplementedError

    def evaluate(self, stage: Stage) -> dict[str, float] | None:
        """Held-out metrics at this stage's length, or None without held-out data."""
        raise NotImplementedError

    def throughput(self, stage: Stage, seconds: float) -> dict[str, float]:
        """What the step processed per second, for metrics.jsonl."""
        raise NotImplementedError

    def progress(self, out: dict[str, float], state: TrainState, throughput: dict[str, float]) -> dict[str, str]:
        """The progress bar's figures."""
        return {"loss": f"{out['loss']:.4f}"}

    def describe(self, val: dict[str, float]) -> str:
        """The log line's words for a validation result."""
        return f"val loss {val['loss']:.4f}"

    def begin_stage(self, state: TrainState, stage: Stage) -> None:
        """Called when a stage starts (or resumes)."""

    def export(self, checkpoint: Path) -> Path:
        """The finished model, from the last checkpoint, in its inference format under RUN_DIR/export."""
        raise NotImplementedError

    def barrier(self) -> None:
        """Wait for every process (one process: nothing to wait for)."""

    def stop_everywhere(self) -> bool:
        """Whether any process was asked to stop (one process: whether this one was)."""
        return self.stop_requested

    # -- the engine -------------------------------------------------------------------------------
    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.stop_requested = True

    def _log(self, record: dict[str, tp.Any]) -> None:
        if self.metrics is not None:
            self.metrics.log(record)

    def _checkpoint(self, state: TrainState) -> Path:
        path = save_checkpoint(self.run_dir, state, self.model, self.optimizer, self.scheduler, self.rank,
                               self.world, self.barrier, self.checkpoint_config.keep)
        log.info("checkpoint %s", path)
        return path

    def _resume(self) -> TrainState:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            return TrainState()
        state = load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.checkpoint_keys, self.rank)
        if self.metrics is not None:
            self.metrics.truncate_after(state.step)
        log.info("resumed from %s: step %d, stage %d step %d", path, state.step, state.stage, state.stage_step)
        return state

    def _validate(self, state: TrainState, stage: Stage) -> None:
        val = self.evaluate(stage)
        if val is not None:
            self._log({"step": state.step, "stage": state.stage, "split": "val", "seq_len": stage.seq_len, **val})
            log.info("step %d %s", state.step, self.describe(val))

    def _record(self, state: TrainState, stage: Stage, out: dict[str, float], rate: dict[str, float]) -> dict:
        record = {"step": state.step, "stage": state.stage, "stage_step": state.stage_step, "split": "train",
                  "seq_len": stage.seq_len, **out, **rate, "time": time.time()}
        if self.device.type == "cuda":  # shows whether memory stays linear as the stages lengthen
            record["max_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return record

    def run(self) -> RunResult:
        state = self._resume()
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        from tqdm import tqdm

        bar = tqdm(total=sum(s.steps for s in self.stages), initial=state.step, unit="step", dynamic_ncols=True,
                   file=sys.stderr, disable=not (self.rank == 0 and self.log_config.progress), mininterval=0.5)
        last_ckpt = latest_checkpoint(self.run_dir)
        stopped = False
        try:
            while state.stage < len(self.stages) and not stopped:
                stage = self.stages[state.stage]
                self.begin_stage(state, stage)
                batches = self.batches(state, stage)
                t0 = time.perf_counter()
                for batch in batches:
                    out = self.step(batch, state, stage)
                    state.step += 1
                    state.stage_step += 1
                    state.samples += self.global_batch
                    rate = self.throughput(stage, time.perf_counter() - t0)
                    stage_done = state.stage_step == stage.steps
                    if state.step % self.log_config.every == 0 or stage_done:
                        self._log(self._record(state, stage, out, rate))
                    bar.set_postfix(refresh=False, **self.progress(out, state, rate))
                    bar.update(1)
                    if self.log_config.eval_every and state.step % self.log_config.eval_every == 0 or stage_done:
                        self._validate(state, stage)
                    if stage_done:
                        state = TrainState(state.step, state.stage + 1, 0, 0)
                    stopped = self.stop_everywhere()
                    if stopped or stage_done or state.step % self.checkpoint_config.every == 0:
                        last_ckpt = self._checkpoint(state)
                    if stopped:
                        log.warning("SIGTERM: stopped at step %d, checkpoint %s", state.step, last_ckpt)
                    if stopped or stage_done:
                        break
                    t0 = time.perf_counter()
                del batches  # stops a stage's reader processes
        finally:
            signal.signal(signal.SIGTERM, previous)
            bar.close()
        finished = state.stage >= len(self.stages)
        export = None
        if finished and last_ckpt is not None:
            export = self.export(last_ckpt)
        if self.skips.skipped:
            log.warning(self.skips.summary())
        if self.metrics is not None:
            self.metrics.close()
        return RunResult(state, finished, last_ckpt, export, len(self.skips.skipped))
