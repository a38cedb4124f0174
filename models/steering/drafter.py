"""The colocated small model as the engine's speculative-decoding drafter (models.protocol.drafter).

Each row is read incrementally (the small model's cache keeps what the request had at the
last step, including the drafts the big model accepted); k proposals are k reads of one token
per row, all rows of the step in one forward each. A row whose big-model adapter has a small
variant of the same name drafts with it, else with the base model. Greedy rows propose the
argmax; sampled rows draw from softmax(logits / temperature) with the row's generator and
hand over those distributions for rejection sampling. The request's logit bias applies to the
drafts too (it would reject them otherwise).

In Serve, `attach_drafter` loads it inside the Generator replica, where a colocated Steerer's
small model runs (same checkpoint, adapters, device and dtype: the `steering:` block), as its
own instance on the engine thread, so the drafter never races another thread for it.
"""

from __future__ import annotations

from typing import Any

import torch

from models.engine.config import SpeculativeConfig
from models.protocol.drafter import Draft, DraftRow
from models.protocol.small_model import SmallModel
from models.steering.config import SteeringSetup
from models.steering.runtime import load_small_model, small_model_source
from models.steering.state import BASE, RequestState, stack_logits


class SmallModelDrafter:
    """Drafts with `small` (a PagedSmallModel or TransformersSmallModel)."""

    def __init__(self, small: SmallModel):
        self.small = small
        self.vocab_size = small.vocab_size
        self.states: dict[str, RequestState] = {}

    def _variant(self, adapter: str | None) -> str:
        return adapter if adapter in self.small.variants else BASE

    @torch.inference_mode()
    def propose(self, rows: list[DraftRow], k: int) -> list[Draft]:
        states = []
        for row in rows:
            state = self.states.get(row.request_id)
            if state is None:
                state = self.states[row.request_id] = RequestState(row.request_id, None)
            state.sync(row.token_ids, row.num_prompt_tokens)
            states.append(state)
        items = [(s, self._variant(r.adapter)) for s, r in zip(states, rows, strict=True)]
        tokens: list[list[int]] = [[] for _ in rows]
        probs: list[list[torch.Tensor]] = [[] for _ in rows]
        for _ in range(k):
            self.small.read(items)
            logits = stack_logits([s.output(v) for s, v in items]).float()
            if any(row.logit_bias for row in rows):
                logits = logits.clone()
                for i, row in enumerate(rows):
                    for token, bias in row.logit_bias.items():
                        logits[i, token] += bias
            for i, row in enumerate(rows):
                if row.temperature == 0:
                    token = int(logits[i].argmax())
                else:
                    q = (logits[i] / row.temperature).softmax(-1)
                    gen = row.generator
                    if gen is not None and gen.device != q.device:
                        gen = None
                    token = int(torch.multinomial(q, 1, generator=gen))
                    probs[i].append(q)
                tokens[i].append(token)
                states[i].generated.append(token)
        return [
            Draft(t, torch.stack(p).cpu() if p else None)
            for t, p in zip(tokens, probs, strict=True)
        ]

    def release(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            state = self.states.pop(rid, None)
            if state is not None:
                self.small.free(state)


def build_drafter(setup: SteeringSetup) -> SmallModelDrafter:
    """The small model of a Tandem config (SteeringSetup: the `steering:` block and the big
    model's source) as a drafter."""
    path, adapters = small_model_source(setup.steering, setup.model_source)
    if path is None:
        raise ValueError(
            "engine.speculative needs a small model to draft with: set "
            "steering.small_model_source or use a builtin model source"
        )
    max_len = setup.steering.max_model_len or setup.max_model_len
    return SmallModelDrafter(load_small_model(setup.steering, path, adapters, max_len))


async def attach_drafter(engine: Any, setup: SteeringSetup, config: SpeculativeConfig) -> bool:
    """Give `engine` the small model as its drafter when `config` asks for one, built on the
    engine's own thread between steps. Returns whether a drafter is attached; raises for an
    engine that cannot verify drafts."""
    if not config.wants_drafter:
        return False
    if not engine.capabilities.speculative_decoding or not hasattr(engine, "set_drafter"):
        raise ValueError(f"engine '{engine.name}' cannot verify drafts: engine.speculative "
                         "(k > 0 or drafter: small_model) needs engine.kind torch")  # fmt: skip
    await engine.run_in_engine_thread(lambda: engine.set_drafter(build_drafter(setup)))
    return True
