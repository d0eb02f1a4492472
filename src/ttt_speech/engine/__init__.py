"""What the LM trainer and the codec trainer share: the staged loop, signals, atomic checkpoints, resume,
metrics, the run command line. Knows no model: a trainer says what a step is (`loop.StagedTrainer`)."""
