"""The DeepSeek-V3 model family and the dense R1-Distill students, in plain PyTorch."""
from r1kit.model.config import PRESETS, ModelConfig
from r1kit.model.transformer import Cache, Transformer

__all__ = ["ModelConfig", "Transformer", "Cache", "PRESETS"]
