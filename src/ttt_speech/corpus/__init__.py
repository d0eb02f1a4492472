"""An offline, reproducible long-form English speech corpus: public-domain texts read by local speech engines.

`build(out, CorpusConfig(...))` writes stereo 24 kHz readings and two-voice dialogues with word
alignments and train/val manifests in the layout `ttt-speech tokenize` reads (docs/corpus.md).
"""

from ttt_speech.corpus.build import BuildReport, CorpusConfig, build

__all__ = ["BuildReport", "CorpusConfig", "build"]
