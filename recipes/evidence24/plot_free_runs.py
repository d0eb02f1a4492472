"""Free runs side by side, per minute, from several eval-long reports (each with one `--minutes` run).

    python plot_free_runs.py OUT.png [LABEL=]EVAL_DIR [[LABEL=]EVAL_DIR ...]   (LABEL: the legend's name, default the run's)

eval-long plots the runs of one report; the arms' 60-minute runs were separate reports (one CPU core each),
and whether the memory arm drifts where the no-memory arm does not is read best on the same axes: the runs
are read back (`FreeRunResult.from_dict`) and drawn by eval-long's own `plots.free_runs`.
"""

import dataclasses
import json
import sys
from pathlib import Path

from ttt_speech.eval.free_run import FreeRunResult
from ttt_speech.eval.plots import free_runs

out, *specs = sys.argv[1:]
runs = []
for spec in specs:
    label, _, d = spec.rpartition("=")
    for run in json.loads((Path(d) / "results.json").read_text())["free_runs"]:
        result = FreeRunResult.from_dict(run)
        runs.append(dataclasses.replace(result, name=label or result.name))
free_runs(runs, Path(out).parent, Path(out).name)
