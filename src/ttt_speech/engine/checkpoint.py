"""Training checkpoints that survive SIGKILL: written to a temporary directory, renamed into place.

RUN_DIR/checkpoints/step_00000120/ holds
  model.safetensors   the trainable parameters, full (gathered from FSDP shards), by their FQN
  optimizer.pt        the optimizer state, full, keyed by FQN (any world size can load it)
  scheduler.pt        the learning-rate scheduler
  rng_rank{r}.pt      python / numpy / torch (/ CUDA) RNG states of every process
  state.json          step, stage, step within the stage, data position (sequences consumed)
A directory named step_* exists only once complete (the rename is atomic), so the newest one is
always safe to resume from; a half-written `.tmp-*` directory left by a kill is deleted on restart.
Frozen weights are not saved: they are the base model's, rebuilt from the config. Checkpoints written
before issue 20 name the memory branch `ttt`; they load under today's names (`names.current_name`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ttt_speech.names import current_keys, current_name

CHECKPOINTS = "checkpoints"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done over all stages
    stage: int = 0  # the stage the next step belongs to
    stage_step: int = 0  # steps done within that stage
    samples: int = 0  # training sequences consumed within that stage (the data position)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (None if there is none)."""
    root = checkpoint_dir(run_dir)
    done = sorted(p for p in root.glob(PREFIX + "*") if (p / "state.json").exists()) if root.exists() else []
    return done[-1] if done else None


def remove_partial(run_dir: str | Path) -> None:
    """Delete temporary directories a killed run left behind (call on rank 0 before training)."""
    for p in checkpoint_dir(run_dir).glob(TMP_PREFIX + "*"):
        shutil.rmtree(p, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_states() -> dict:
    out = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(run_dir: str | Path, state: TrainState, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, rank: int, world: int,
                    barrier: Callable[[], None], keep: int) -> Path:
    """Write a checkpoint collectively (every process calls this); returns its directory."""
    root = checkpoint_dir(run_dir)
    final = root / f"{PREFIX}{state.step:08d}"
    tmp = root / f"{TMP_PREFIX}{final.name}"
    model_sd = get_model_state_dict(model, options=_FULL)  # collectives: every rank takes part
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_states(), tmp / f"rng_rank{rank}.pt")
    _fsync(tmp / f"rng_rank{rank}.pt")
    barrier()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in model_sd.items()}, str(tmp / "model.safetensors"))
        torch.save(optim_sd, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state) | {"world_size": world}, indent=2) + "\n")
        for f in tmp.iterdir():
            _fsync(f)
        if final.exists():  # re-saving a step (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
        for old in sorted(root.glob(PREFIX + "*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_trainable(path: Path) -> dict[str, torch.Tensor]:
    return current_keys(load_file(str(path / "model.safetensors")))


def load_optimizer(path: Path) -> dict:
    """optimizer.pt, its parameters (keys of "state", names in each group's "params") under today's names."""
    sd = torch.load(path / "optimizer.pt", weights_only=False)
    groups = [{**g, "params": [current_name(n) for n in g["params"]]} for g in sd["param_groups"]]
    return {**sd, "state": current_keys(sd["state"]), "param_groups": groups}


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, trainable: list[str], rank: int) -> TrainState:
    """Restore everything `save_checkpoint` wrote into the (possibly wrapped) model and optimizer."""
    model_sd = load_trainable(path)
    missing, extra = sorted(set(trainable) - set(model_sd)), sorted(set(model_sd) - set(trainable))
    if missing or extra:
        raise ValueError(f"{path}: checkpoint does not match the trainable parameters of this config "
                         f"(missing {missing[:5]}, unexpected {extra[:5]}); did train.trainable or the model change?")
    set_model_state_dict(model, model_sd, options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(model, optimizer, load_optimizer(path), options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng = path / f"rng_rank{rank}.pt"
    if rng.exists():  # absent when resuming on more processes than saved
        set_rng_states(torch.load(rng, weights_only=False))
    raw = json.loads((path / "state.json").read_text())
    raw.pop("world_size", None)
    return TrainState(**raw)
