"""LoRA adapter routing: which adapter(s) serve a prompt, and where adapters may be loaded from.

router.py: AdapterRouter (MiniLM embedding + classifier head). adapter_paths.py: path confinement
under router.adapter_roots and PEFT directory checks. config.py: the adapters/router config.
"""
