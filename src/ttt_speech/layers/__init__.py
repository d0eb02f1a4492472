"""nn.Modules and their explicit streaming state."""

from ttt_speech.layers.state import TTTState
from ttt_speech.layers.ttt import TTTLayer

__all__ = ["TTTLayer", "TTTState"]
