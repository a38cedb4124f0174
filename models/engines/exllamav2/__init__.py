"""The exllamav2 engine (`engine.kind: exllamav2`, CUDA only): see models.engines.exllamav2.engine."""

from models.engines.exllamav2.engine import ExLlamaV2Engine

__all__ = ["ExLlamaV2Engine"]
