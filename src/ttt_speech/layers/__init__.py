"""nn.Modules and their explicit streaming state. Importing any of its modules imports them all, so every config in
`layers/config.py` finds the layer it builds."""

from ttt_speech.layers.gated_deltanet import GatedDeltaNetLayer, GatedDeltaNetState
from ttt_speech.layers.inplace import InPlaceLayer, InPlaceState
from ttt_speech.layers.state import LayerState, TTTState
from ttt_speech.layers.ttt import TTTLayer

__all__ = ["GatedDeltaNetLayer", "GatedDeltaNetState", "InPlaceLayer", "InPlaceState", "LayerState", "TTTLayer", "TTTState"]
