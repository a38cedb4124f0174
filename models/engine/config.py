"""Engine settings (the `engine:` block of the config)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_SPECULATIVE_K = 16


class SpeculativeConfig(BaseModel):
    """Speculative decoding: the small model drafts k tokens per step and row inside the
    Generator replica, the big model verifies them in the step's one forward (exact: the
    output is what the big model alone would give). Off by default: on the CPU's built-in
    pair it does not pay (both toy models are launch-bound; README, bench/speculative.py)."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(
        0, ge=0, le=MAX_SPECULATIVE_K,
        description="Tokens drafted per step and row for requests that name no k; 0 = only "
        "requests that ask (tandem.speculative.k) speculate.",
    )  # fmt: skip
    max_k: int = Field(
        8, ge=1, le=MAX_SPECULATIVE_K, description="Largest k a request may ask for (400 above)."
    )
    drafter: Literal["auto", "small_model", "none"] = Field(
        "auto",
        description="small_model: load the small model (steering.small_model_source, or the "
        "builtin source's) as the drafter in each Generator replica, on the steering device; "
        "auto: only when k > 0; none: never (requests asking for speculation get a 400).",
    )

    @model_validator(mode="after")
    def _k_needs_a_drafter(self) -> SpeculativeConfig:
        if self.k > 0 and self.drafter == "none":
            raise ValueError("k > 0 needs a drafter: set drafter to auto or small_model")
        if self.k > self.max_k:
            raise ValueError(f"k ({self.k}) is above max_k ({self.max_k})")
        return self

    @property
    def wants_drafter(self) -> bool:
        return self.drafter == "small_model" or (self.drafter == "auto" and self.k > 0)


class EngineConfig(BaseModel):
    """How the Generator runs the big model."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(
        "torch",
        description="Engine implementation: torch (the own engine), vllm, exllamav2, or an "
        "import path module:Class of an Engine subclass (e.g. tests.fakes.engine:FakeEngine).",
        pattern=r"^(torch|vllm|exllamav2|[\w.]+:\w+)$",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the model runs; auto picks CUDA when a GPU is visible."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight and activation dtype; auto = float32 on CPU, bfloat16 on CUDA."
    )
    block_size: int = Field(16, ge=1, le=256, description="Tokens per KV-cache block.")
    num_kv_blocks: int | None = Field(
        None, ge=2, description="KV-cache blocks; None sizes the cache from free memory."
    )
    kv_cache_memory_fraction: float = Field(
        0.85, gt=0, le=0.98, description="Share of free GPU memory the KV cache may take (CUDA)."
    )
    kv_cache_cpu_gib: float = Field(
        0.5, gt=0, description="KV-cache size in GiB when running on CPU."
    )
    prefix_caching: bool = Field(
        True,
        description="Share the KV blocks of a repeated prompt prefix (system prompts, chat "
        "history, n > 1) between requests instead of prefilling it again.",
    )
    gil_switch_interval_ms: float | None = Field(
        None, gt=0, le=100,
        description="Python's thread switch interval (sys.setswitchinterval) in the engine's "
        "process, in ms; unset leaves Python's 5 ms. The engine's thread shares the "
        "interpreter lock with the replica's event loop: a shorter interval hands it back to "
        "the step loop sooner while the loop is busy (process-wide; torch engine).",
    )  # fmt: skip
    speculative: SpeculativeConfig = Field(
        default_factory=SpeculativeConfig,
        description="Speculative decoding with the colocated small model as drafter.",
    )
    max_num_seqs: int = Field(64, ge=1, description="Most sequences in the running batch.")
    max_num_batched_tokens: int = Field(
        4096,
        ge=16,
        description="Most tokens (decode rows first, then prompt chunks) run in one engine step. "
        "4096 is the measured knee on an H100: 96 % of the prefill tok/s of 8192, while decode "
        "rows beside a long prompt wait 28 ms per step instead of 46 (bench/prefill.py).",
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Context window (prompt + completion); None = the model's own."
    )
    max_queue_len: int = Field(
        1024, ge=1, description="Waiting requests beyond which new ones get 429."
    )
    cuda_graphs: bool = Field(True, description="Capture decode steps in CUDA graphs (CUDA only).")
    cuda_graph_batch_sizes: list[int] = Field(
        default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128],
        description="Batch-size buckets captured as CUDA graphs.",
    )
    hidden_capture_layers: list[int] = Field(
        default_factory=list,
        description="Layers whose residual stream the decode CUDA graphs can also capture (a "
        "second set of graphs, replayed only in steps where a row reads hidden states: probe "
        "policies, client activations). A step reading a layer outside this set runs without "
        "graphs. Set it to the layers your probes and clients read.",
    )
    max_adapters_per_replica: int = Field(
        8, ge=0, description="LoRA adapters resident at once; least recently used are evicted."
    )
    max_lora_rank: int = Field(16, ge=1, description="Largest LoRA rank the engine accepts.")
    seed: int = Field(0, description="Seed for requests that give none.")
    structured_output: str | None = Field(
        "models.structured.llguidance_compiler:LLGuidanceCompiler",
        description="Import path module:Class of the ConstraintCompiler that turns "
        "response_format and constrained tool calls into token masks; None turns them off.",
    )
    vllm: dict[str, Any] = Field(
        default_factory=dict,
        description="kind vllm: vLLM engine arguments (AsyncEngineArgs fields, e.g. "
        "tensor_parallel_size, distributed_executor_backend, gpu_memory_utilization), passed "
        "through verbatim over what the settings above map to.",
    )
