"""Hugging Face integration: TTT hybrids of transformers decoder LLMs (Llama-3.1, Qwen2/Qwen2.5, LLaMA-Omni).

    from ttt_speech.hf import convert
    model = convert(model, layers=range(24, 32), mode="hybrid", ttt=TTTConfig(...), attention_window=4096)
    model.generate(ids, max_new_tokens=200_000)   # memory bounded by the window + the TTT states
    model.save_pretrained("out/"); model = convert.load("out/")
"""

try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("ttt_speech.hf needs transformers: pip install 'ttt-speech[hf]'") from e

from ttt_speech.hf import compat  # noqa: F401  (first: refuses an untested transformers release)
from ttt_speech.hf.cache import TTTCache
from ttt_speech.hf.checkpoint import LoadReport, load_llm
from ttt_speech.hf.conversion import Converter, convert
from ttt_speech.hf.section import TTTSection

__all__ = ["Converter", "LoadReport", "TTTCache", "TTTSection", "convert", "load_llm"]
