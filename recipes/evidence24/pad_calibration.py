"""Issue 24, section 14 (exploratory): is the free runs' pad collapse already in the teacher-forced model?

    PYTHONPATH=src python recipes/evidence24/pad_calibration.py DATA_FILE NAME=MODEL_DIR [NAME=MODEL_DIR ...]

For each model, one teacher-forced pass (`LMModel.forward`, the memory in its chunked form) over the first 8192
frames of every sequence of a held-out token file: the mean probability the text head gives the two pad ids
against the share of pad targets, per position bucket. A model whose memory pushed the pads down as it filled
would show it here; one calibrated at every position collapses only when it reads its own samples.
"""
import sys

import torch
from safetensors.torch import load_file

from ttt_speech.eval.models import load_model

FRAMES = 8192
EDGES = (0, 64, 256, 1024, 4096, FRAMES)


@torch.no_grad()
def calibration(lm: torch.nn.Module, sequences: list[torch.Tensor]) -> list[tuple[float, float]]:
    """(mean P(pad), pad share of the targets) per bucket of EDGES, over the scored text positions (NaN where a
    bucket lies past the sequences)."""
    pads = torch.tensor([lm.text_padding_token_id, lm.end_of_text_padding_id])
    sums = torch.zeros(len(EDGES) - 1, 3)  # P(pad), pad targets, positions
    for codes in sequences:
        out = lm.forward(codes[None, :, :FRAMES].long())
        p_pad = out.text_logits.float().softmax(-1)[0, 0][:, pads].sum(-1)
        target, scored = codes[0, :FRAMES].long(), out.text_mask[0, 0].bool()
        for i, (a, b) in enumerate(zip(EDGES, EDGES[1:])):
            m = scored[a:b]
            sums[i] += torch.stack([p_pad[a:b][m].sum(), torch.isin(target[a:b][m], pads).sum(), m.sum()])
    return [(float(s[0] / s[2]), float(s[1] / s[2])) if s[2] else (float("nan"),) * 2 for s in sums]


def main(data_file: str, specs: list[str]) -> None:
    torch.set_num_threads(1)
    data = load_file(data_file)
    sequences = [data[k] for k in sorted(data, key=int)]
    print("| model | " + " | ".join(f"[{a}, {b})" for a, b in zip(EDGES, EDGES[1:])) + " |")
    print("|---" * len(EDGES) + "|")
    for spec in specs:
        rows = calibration(load_model(spec).scorer.model, sequences)
        print(f"| {spec.split('=')[0]} | " + " | ".join(f"{p:.3f} / {s:.3f}" for p, s in rows) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
