"""Everything Tandem computes: engines, steering, LoRA, routing, retrieval, offline models.

Nothing in this package imports Ray, so every piece runs in-process in tests and benchmarks.
"""
