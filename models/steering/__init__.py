"""Steering: the small model in the loop, token by token.

- protocol.py: events (Prefilled, ForwardPass, Sampled, Added), actions, the one legality
  table, RowEvents / RowActions (what travels between the engine and the Steerer).
- config.py: the `steering:` block (vectors, policies, small-model runner and device).
- vectors.py: SteeringVector, extraction from contrastive pairs (mean / PCA), GGUF control
  vectors (llama.cpp / repeng layout) and safetensors, VectorLibrary, ensure_default_vectors.
- runtime.py: SteeringRuntime, events of one engine step -> actions, one small-model forward
  for all rows, per-request state with resync. Used colocated and inside deployments/steerer.py.
- small_model.py / paged_small_model.py: the small model on transformers (any causal LM) or on
  the torch engine's paged runner (Llama family, CUDA graphs); both read only unread tokens.
- policies/: Policy and the built-ins vector_guard, proxy_tuning, contrastive.
"""
