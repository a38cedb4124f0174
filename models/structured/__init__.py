"""Structured output: OutputConstraints compiled into per-row token masks (llguidance).

Imports models.protocol only; the engine finds the compiler by the import path in its config
(`engine.structured_output`), so models.engine never imports this package.
"""
