"""ttt-speech: Test-Time-Training layers that give speech language models memory that does not run out."""

from ttt_speech.config import TTTConfig
from ttt_speech.layers.state import TTTState
from ttt_speech.layers.ttt import TTTLayer

__all__ = ["TTTConfig", "TTTLayer", "TTTState"]
__version__ = "0.1.0"
