"""Native forward of the Llama family (Llama, Mistral, Qwen2, Qwen3) over the paged KV cache.

Loads Hugging Face safetensors + config.json; q/k/v and gate/up are fused into one matmul
each. Qwen3 adds per-head q/k RMSNorm, Qwen2 adds q/k/v bias. The same code runs on CPU
(float32) and CUDA (bfloat16). Tokens of all sequences in a step are flattened into one
[num_tokens] batch; attention splits them again (see models.engine.attention).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from models.engine.attention import ForwardBatch, paged_attention, store_kv, varlen_attention
from models.engine.hidden_capture import LayerCapture
from models.engine.kernels.decode_attention import NewToken
from models.engine.kernels.launch import use_triton
from models.engine.kernels.norm_rope import rms_norm
from models.engine.lora import LinearWithLoRA

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class ModelArgs:
    """The architecture numbers read from a checkpoint's config.json."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool

    @classmethod
    def from_config(cls, cfg: dict) -> ModelArgs:
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type '{model_type}' is not supported by the torch engine "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        heads = cfg["num_attention_heads"]
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta") or rope.get("rope_theta", 10000.0),
            rope_scaling=None if rope_type == "default" else dict(rope, rope_type=rope_type),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=model_type == "qwen2" or cfg.get("attention_bias", False),
            qk_norm=model_type == "qwen3",
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        steer: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """RMSNorm(x). With `residual`: h = x + residual (+ steer) is written back into
        `residual` (the residual stream) and RMSNorm(h) is returned; one fused kernel on CUDA."""
        return rms_norm(x, self.weight, self.eps, residual, steer)[0]


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies, with linear or llama3 rope scaling applied when configured."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq.float()
    kind = scaling["rope_type"]
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        return torch.where(mid, blended, scaled).float()
    raise ValueError(f"rope scaling type '{kind}' is not supported (supported: linear, llama3)")


class RotaryEmbedding(nn.Module):
    """Non-interleaved RoPE (rotate_half), cos/sin cached for every position up to max_len."""

    def __init__(self, args: ModelArgs, max_len: int):
        super().__init__()
        self.register_buffer("cos", torch.empty(max_len, args.head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_len, args.head_dim), persistent=False)
        self.args = args

    def fill(self) -> None:
        """Compute the cos/sin tables (after the module reached its device)."""
        positions = torch.arange(self.cos.shape[0], dtype=torch.float32, device=self.cos.device)
        freqs = positions[:, None] * rope_inv_freq(self.args).to(self.cos.device)[None]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos.copy_(emb.cos())
        self.sin.copy_(emb.sin())

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        cos = self.cos[positions].unsqueeze(1).to(x.dtype)
        sin = self.sin[positions].unsqueeze(1).to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            args.num_heads,
            args.num_kv_heads,
            args.head_dim,
        )
        q_size, kv_size = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.qkv_proj = LinearWithLoRA(args.hidden_size, [q_size, kv_size, kv_size], args.qkv_bias)
        self.o_proj = LinearWithLoRA(q_size, [args.hidden_size], False)
        self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps) if args.qk_norm else None
        self.rotary = rotary
        self.scale = args.head_dim**-0.5
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch):
        qkv = self.qkv_proj(x, batch)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if use_triton(qkv):  # q/k norm, RoPE and the cache write in one kernel
            half = self.head_dim // 2
            new = NewToken(
                k, v, positions, self.rotary.cos[:, :half], self.rotary.sin[:, :half],
                self.q_norm.weight if self.q_norm is not None else None,
                self.k_norm.weight if self.k_norm is not None else None,
                self.q_norm.eps if self.q_norm is not None else 0.0, batch.slot_mapping,
            )  # fmt: skip
            if batch.is_decode:  # ... inside the attention kernel: one launch fewer
                out = paged_attention(
                    q, self.k_cache, self.v_cache, batch, self.scale, new_token=new
                )
                return self.o_proj.forward_partials(out.reshape(-1, q_size), batch)
            new.prepare(q, self.k_cache, self.v_cache)
        else:
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rotary(positions, q), self.rotary(positions, k)
            store_kv(self.k_cache, self.v_cache, k, v, batch.slot_mapping)
        if batch.is_decode:
            out = paged_attention(q, self.k_cache, self.v_cache, batch, self.scale)
        else:
            out = varlen_attention(q, self.k_cache, self.v_cache, batch, self.scale)
        return self.o_proj.forward_partials(out.reshape(-1, q_size), batch)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        inter = args.intermediate_size
        self.gate_up_proj = LinearWithLoRA(args.hidden_size, [inter, inter], False)
        self.down_proj = LinearWithLoRA(inter, [args.hidden_size], False)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.down_proj.forward_partials(self.gate_up_proj.forward_gated(x, batch), batch)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, rotary: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, rotary)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(
        self,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        batch: ForwardBatch,
        steer: torch.Tensor | None = None,
        capture=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h is the previous layer's output before its residual add (the embeddings for the
        first layer, with residual None); `steer` is added to the completed previous layer's
        output, which `capture` (LayerCapture.writer) then copies out. Returns this layer's MLP
        output (on CUDA maybe as split-K partial sums, which the next fused norm adds up) and
        the residual stream, still to be added."""
        if residual is None:
            residual = h
            x = self.input_layernorm(h)
        else:
            x = self.input_layernorm(h, residual, steer)
            if capture is not None:  # the residual holds the previous layer's output only now
                capture(residual)
        x = self.post_attention_layernorm(self.self_attn(x, positions, batch), residual)
        return self.mlp(x, batch), residual


class LlamaForCausalLM(nn.Module):
    """The whole model: forward(token ids, positions, batch) -> final hidden states."""

    def __init__(self, args: ModelArgs, max_len: int):
        super().__init__()
        self.args = args
        rotary = RotaryEmbedding(args, max_len)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(args, rotary) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Parameter(
            torch.empty(args.vocab_size, args.hidden_size), requires_grad=False
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        batch: ForwardBatch,
        capture: LayerCapture | None = None,
    ):
        """Final hidden states (normed); with `capture`, the residual stream at its layers is
        copied into `capture.out` on the way."""
        h, residual = self.embed_tokens(input_ids), None
        for index, layer in enumerate(self.layers):
            write = None if capture is None else capture.writer(index - 1)
            h, residual = layer(h, residual, positions, batch, self._steer(batch, index - 1), write)
        last = len(self.layers) - 1
        out = self.norm(h, residual, self._steer(batch, last))
        write = None if capture is None else capture.writer(last)
        if write is not None:
            write(residual)
        return out

    @staticmethod
    def _steer(batch: ForwardBatch, layer: int) -> torch.Tensor | None:
        """Per-token delta added to layer `layer`'s output: h_l += c * v_l (zero rows when
        unsteered), fused into the next norm's residual add."""
        if batch.steer_deltas is None or layer < 0:
            return None
        delta = batch.steer_deltas[layer]
        return delta if batch.is_decode else delta.index_select(0, batch.token_rows)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden, self.lm_head)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn for layer in self.layers]

    def lora_linears(self) -> dict[str, tuple[LinearWithLoRA, int]]:
        """HF projection name pattern -> (fused layer, part index), per layer, for LoRA."""
        out = {}
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            prefix = f"layers.{i}."
            for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
                out[prefix + "self_attn." + name] = (attn.qkv_proj, part)
            out[prefix + "self_attn.o_proj"] = (attn.o_proj, 0)
            out[prefix + "mlp.gate_proj"] = (mlp.gate_up_proj, 0)
            out[prefix + "mlp.up_proj"] = (mlp.gate_up_proj, 1)
            out[prefix + "mlp.down_proj"] = (mlp.down_proj, 0)
        return out


def read_model_args(path: str | Path) -> ModelArgs:
    return ModelArgs.from_config(json.loads((Path(path) / "config.json").read_text()))


def load_llama(
    path: str | Path, device: torch.device, dtype: torch.dtype, max_len: int
) -> LlamaForCausalLM:
    """Build the model from a checkpoint directory and load its safetensors weights."""
    path = Path(path)
    args = read_model_args(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(str(file)))  # on the host, in the checkpoint's dtype
    # Built on the meta device and given storage straight in the target dtype, so the device
    # holds each weight once (no float32 pass: peak = the weight bytes).
    state = _fuse_weights(weights, args)
    tied = state["lm_head"] is state["embed_tokens.weight"]
    with torch.device("meta"):
        model = LlamaForCausalLM(args, max_len).to(dtype)
    if tied:  # one tensor for the embedding and the output head, as in the checkpoint
        del model.lm_head, state["lm_head"]
    model = model.to_empty(device=device)
    missing, _ = model.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights for: {', '.join(missing[:5])}")
    if tied:
        model.lm_head = model.embed_tokens.weight
    model.layers[0].self_attn.rotary.float().fill()
    return model


def _fuse_weights(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Map HF names onto this model's names, fusing q/k/v and gate/up."""
    w = {k.removeprefix("model."): v for k, v in weights.items()}
    state = {
        "embed_tokens.weight": w["embed_tokens.weight"],
        "norm.weight": w["norm.weight"],
        "lm_head": w.get("lm_head.weight", w["embed_tokens.weight"]),
    }
    for i in range(args.num_layers):
        p = f"layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        state[p + "input_layernorm.weight"] = w[p + "input_layernorm.weight"]
        state[p + "post_attention_layernorm.weight"] = w[p + "post_attention_layernorm.weight"]
        state[attn + "qkv_proj.weight"] = torch.cat(
            [w[attn + n + ".weight"] for n in ("q_proj", "k_proj", "v_proj")]
        )
        if args.qkv_bias:
            state[attn + "qkv_proj.bias"] = torch.cat(
                [w[attn + n + ".bias"] for n in ("q_proj", "k_proj", "v_proj")]
            )
        state[attn + "o_proj.weight"] = w[attn + "o_proj.weight"]
        if args.qk_norm:
            state[attn + "q_norm.weight"] = w[attn + "q_norm.weight"]
            state[attn + "k_norm.weight"] = w[attn + "k_norm.weight"]
        state[mlp + "gate_up_proj.weight"] = torch.cat(
            [w[mlp + "gate_proj.weight"], w[mlp + "up_proj.weight"]]
        )
        state[mlp + "down_proj.weight"] = w[mlp + "down_proj.weight"]
    return state
