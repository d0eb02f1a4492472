"""The memory layers' configs: `TTTConfig`, `GatedDeltaNetConfig`, `InPlaceConfig` (defined in `layers/config.py`,
beside the layers they build; this is their public address)."""

from ttt_speech.layers.config import DictConfig, GatedDeltaNetConfig, InPlaceConfig, TTTConfig

__all__ = ["DictConfig", "GatedDeltaNetConfig", "InPlaceConfig", "TTTConfig"]
