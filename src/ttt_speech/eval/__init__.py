"""Long-context evaluation of speech LMs (`ttt-speech eval-long`): where a model breaks, and the evidence.

    long_context.py  teacher-forced per-position loss, degradation rule, OOM, cost per length
    free_run.py      N minutes of free generation scored per minute (gibberish.py, asr.py, speaker.py)
    conversation.py  long two-speaker dialogues: user-stream loss and voice consistency per minute
    spans.py         loss on labelled spans: corpus re-reads, copies G frames later (recall vs distance)
    memory_probe.py  `ttt-speech probe-memory`: whether a memory state stores a span (its loss on copies)
    models.py        the models compared, each streamed in its production form; data.py: token shards
    report.py        report.md, results.json and the plots (plots.py); commands.py: the CLI

Importing this package imports neither moshi nor transformers; the modules that need them do.
"""
