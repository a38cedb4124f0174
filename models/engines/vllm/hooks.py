"""Steering vectors inside vLLM: forward hooks on the decoder layers, per request, eager mode only.

vLLM runs the model in its worker process(es); `SteeringWorkerExtension` is mixed into each
worker (the `worker_extension_cls` engine argument) and `tandem_install_hooks` (called once
through `collective_rpc`) registers a forward pre-hook on the model, which plans the step, and a
forward hook on each decoder layer, which adds the plan's rows to the layer's output. A steered
request carries its deltas in `SamplingParams.extra_args` (VECTORS_KEY: {layer: c * v_l summed
over its vectors, as a list of floats}), so every worker (every tensor-parallel rank: the hidden
state after a layer is whole on each) sees them with the request, without a registry to keep in
sync. The plan maps this step's flattened tokens to requests through the model runner's batch
(input_batch.req_ids, query_start_loc): every token of a steered request, prompt and generated,
gets h_l += delta_l after layer l, as in the torch engine.

Only in eager mode: under torch.compile or CUDA graphs the Python hooks would be traced once,
not run per step, so the engine offers hidden_state_steering only with enforce_eager.
"""

from __future__ import annotations

import torch

VECTORS_KEY = "tandem_vectors"  # SamplingParams.extra_args: {layer (str): [hidden floats]}
EXTENSION = "models.engines.vllm.hooks.SteeringWorkerExtension"  # vLLM: a dotted path


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a vLLM causal LM (model.model.layers in Llama-family models)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise RuntimeError(f"no decoder layers found on {type(model).__name__}")
    return list(layers)


class StepPlan:
    """Per layer, the rows [num_tokens, hidden] to add in this forward (None: no steered row)."""

    def __init__(self, runner):
        self.runner = runner
        self.deltas: dict[int, torch.Tensor] = {}
        self.rows: dict[str, dict[int, torch.Tensor]] = {}  # request id -> its deltas, as tensors

    def plan(self, num_tokens: int, like: torch.Tensor) -> None:
        """Rows for this forward's num_tokens tokens, dtype and device of `like` [0, hidden]."""
        self.deltas = {}
        batch = self.runner.input_batch
        req_ids = list(batch.req_ids)
        steered = []
        for i, rid in enumerate(req_ids):
            state = self.runner.requests.get(rid)
            params = getattr(state, "sampling_params", None)
            extra = (params.extra_args or {}) if params is not None else {}
            if VECTORS_KEY in extra:
                steered.append((i, extra[VECTORS_KEY]))
        for gone in set(self.rows) - set(req_ids):
            del self.rows[gone]
        if not steered:
            return
        starts = self.runner.query_start_loc.cpu[: len(req_ids) + 1].tolist()
        for i, layers in steered:
            tensors = self.rows.get(req_ids[i])
            if tensors is None:  # converted once per request, not every step
                tensors = self.rows[req_ids[i]] = {
                    int(layer): torch.tensor(values, dtype=like.dtype, device=like.device)
                    for layer, values in layers.items()}  # fmt: skip
            for layer, delta in tensors.items():
                rows = self.deltas.get(layer)
                if rows is None:
                    rows = self.deltas[layer] = like.new_zeros(num_tokens, like.shape[-1])
                rows[starts[i]:starts[i + 1]] += delta


class SteeringWorkerExtension:
    """Mixed into vLLM's worker (see the module docstring); methods called by collective_rpc."""

    def tandem_install_hooks(self) -> int:
        """Hook the decoder layers once; returns the number of layers hooked."""
        if getattr(self, "_tandem_plan", None) is not None:
            return len(self._tandem_hooked)
        model = self.model_runner.get_model()
        plan = self._tandem_plan = StepPlan(self.model_runner)
        layers = decoder_layers(model)
        device = next(model.parameters()).device
        layers_hidden = self.model_runner.model_config.get_hidden_size()

        def before(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            num = ids.shape[0] if ids is not None else kwargs["inputs_embeds"].shape[0]
            plan.plan(num, torch.empty(0, layers_hidden, device=device, dtype=torch.float32))

        def after(index: int):
            def hook(module, args, output):
                rows = plan.deltas.get(index)
                if rows is None:
                    return None
                hidden = output[0] if isinstance(output, tuple) else output
                hidden.add_(rows[: hidden.shape[0]].to(hidden.dtype))
                return None

            return hook

        model.register_forward_pre_hook(before, with_kwargs=True)
        self._tandem_hooked = [layer.register_forward_hook(after(i))
                               for i, layer in enumerate(layers)]  # fmt: skip
        return len(layers)
