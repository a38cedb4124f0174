"""Engines over other inference packages (optional installs), behind the Engine contract.

Each lives in its own package and imports its package at the top, so `build_engine` reports an
engine whose package is missing as unavailable. They may use models.engine's pieces (tokenizer,
admission checks, how adjustments are applied) and models.steering (logit policies that run
inside the other engine's process), never the layers above.
"""
