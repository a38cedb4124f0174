"""The vLLM engine (`engine.kind: vllm`): see models.engines.vllm.engine."""

from models.engines.vllm.engine import VllmEngine

__all__ = ["VllmEngine"]
