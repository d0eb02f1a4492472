"""`python -m ttt_speech.train CONFIG.yaml` (also under torchrun), `... tokenize ...`, `... plot-run RUN_DIR`."""

from ttt_speech.train.commands import main

raise SystemExit(main())
