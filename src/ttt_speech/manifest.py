"""The audio a data pipeline reads: a jsonl manifest of wav files, and whose words are the model's own.

Both the LM's tokenizer (`ttt-speech tokenize`) and the codec trainer read the same manifests, so the
format is defined once, below both.
"""

from __future__ import annotations

import json
from pathlib import Path

from ttt_speech.engine.skips import SkipLog

MAIN_SPEAKER = "SPEAKER_MAIN"  # the speaker label of alignments whose words form the model's text stream


def read_manifest(path: Path, skips: SkipLog) -> list[str]:
    """Relative wav paths from a jsonl manifest (malformed lines are bad input)."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            out.append(str(entry["path"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            skips.bad(f"{path}:{n}", f'expected {{"path": ..., "duration": ...}}, got {line[:80]!r}')
    return out
