"""A synthetic Moshi task that needs memory beyond the attention window: key -> value recall.

Each sequence first shows `pairs` (key, value) pairs on the user's input-only streams (user
codebook 0 = key, user codebook 1 = value), and the model says each value right away on its text
stream (value v as text token v + TEXT_OFFSET), which teaches it how a value maps to text. After
`gap` padding frames the user names the keys again, in a random order, without values: the model
must say each key's value, seen more than the attention window ago. Attention alone is at chance
(log(card)); a TTT layer can store the pairs in its fast weights.

Written for Moshi's layout: [text, model codebooks, user codebooks], with the user's codebooks
k >= 1 delayed by one frame (the released delays); the model's own audio is empty (-1: no input,
no loss), so the loss is the text stream alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from ttt_speech.train.model import Batch

TEXT_OFFSET = 4  # text ids 0-3 are Moshi's special tokens (0 end of padding, 3 padding)
TEXT_PAD = 3


@dataclass(frozen=True)
class RecallTask:
    pairs: int = 8
    gap: int = 12  # padding frames between the last pair and the first question
    card: int = 32  # keys and values are audio tokens 0..card-1
    dep_q: int = 2  # model codebooks (their rows stay empty)
    user_q: int = 2

    @property
    def length(self) -> int:
        return 2 + self.pairs + self.gap + 2 * self.pairs

    @property
    def answers_from(self) -> int:
        """First frame of the question part (frames before it hold no recall target)."""
        return 2 + self.pairs + self.gap

    def sequence(self, rng: np.random.Generator) -> np.ndarray:
        """One [1 + dep_q + user_q, length] int16 sequence."""
        a = np.full((1 + self.dep_q + self.user_q, self.length), -1, np.int16)
        a[0] = TEXT_PAD
        key_row, value_row = 1 + self.dep_q, 2 + self.dep_q
        keys = rng.choice(self.card, self.pairs, replace=False)
        values = rng.choice(self.card, self.pairs, replace=False)
        for i in range(self.pairs):  # frame 2 + i: the model says value i, heard with key i
            a[key_row, 1 + i] = keys[i]  # read at the same step as ...
            a[value_row, i] = values[i]  # ... this one, whose stream is one frame late
            a[0, 2 + i] = values[i] + TEXT_OFFSET
        for j, i in enumerate(rng.permutation(self.pairs)):
            q = self.answers_from + 2 * j
            a[key_row, q - 1] = keys[i]
            a[0, q] = values[i] + TEXT_OFFSET
        return a

    def write(self, path: str | Path, count: int, seed: int) -> Path:
        """A safetensors shard of `count` sequences (one document each)."""
        rng = np.random.default_rng(seed)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({str(i): self.sequence(rng) for i in range(count)}, str(path))
        return Path(path)

    def recall_batch(self, batch: Batch, codes: torch.Tensor) -> Batch:
        """`batch` (prepared from `codes`) with loss weight 1 on the answers to questions only."""
        weights = torch.zeros_like(batch.weights)
        answers = codes[:, 0, self.answers_from:] != TEXT_PAD
        weights[:, 0, self.answers_from:] = answers.float()
        return Batch(batch.inputs, weights)


def main(argv: list[str] | None = None) -> None:
    """`python -m ttt_speech.train.synthetic`: the recall shards configs/tiny_recall.yaml trains on."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m ttt_speech.train.synthetic", description=main.__doc__)
    p.add_argument("--out", default="runs", help="directory of recall_train.safetensors / recall_val.safetensors")
    p.add_argument("--train", type=int, default=4096, help="training sequences")
    p.add_argument("--val", type=int, default=64, help="validation sequences")
    args = p.parse_args(argv)
    task = RecallTask()
    for name, count, seed in (("train", args.train, 0), ("val", args.val, 1)):
        print(task.write(Path(args.out) / f"recall_{name}.safetensors", count, seed))


if __name__ == "__main__":
    main()
