"""The contracts, on their own floor: imports nothing else of models/.

requests (what goes into an engine), outputs (what comes out), errors, engine (the Engine
class the Generator calls), steering (events, actions, the legality table, what travels
between Generator and Steerer, the StepObserver), small_model (what a steering model offers).
"""
