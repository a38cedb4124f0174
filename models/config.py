"""The one config schema: what `args:` of serve_config.yaml may hold.

Each concern owns its block (engine, adapters, router, retrieval, steering); this module composes
them, adds the per-deployment Ray options, and turns validation failures into messages a person
can act on. Unknown keys are rejected everywhere.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.activations.store import ActivationStoreConfig
from models.engine.config import EngineConfig
from models.retrieval.config import RetrievalConfig
from models.routing.config import AdapterConfig, RouterConfig
from models.steering.config import SteeringConfig
from models.tracing import TelemetryConfig


class ModelConfig(BaseModel):
    """The big model served."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("tandem", description="Model id clients send as `model` (the base).")
    source: str = Field(
        "builtin:toy",
        description="Checkpoint directory (Hugging Face safetensors + config + tokenizer), "
        "or builtin:toy (trained toy world) / builtin:tiny (random, for tests).",
    )


class AutoscalingOptions(BaseModel):
    """Ray Serve autoscaling for one deployment."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0, description="Fewest replicas.")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(
        8, gt=0, description="Ongoing requests per replica the autoscaler aims at."
    )


class DeploymentOptions(BaseModel):
    """Ray resources and scaling of one deployment."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1, description="Replicas, when autoscaling is not set.")
    autoscaling: AutoscalingOptions | None = Field(
        None, description="Scale between min and max replicas instead of a fixed count."
    )
    num_cpus: float = Field(0.25, ge=0, description="CPUs reserved per replica (fractions ok).")
    num_gpus: float = Field(0, ge=0, description="GPUs reserved per replica (fractions ok).")
    max_ongoing_requests: int = Field(64, ge=1, description="Concurrent requests per replica.")
    max_queued_requests: int = Field(
        -1,
        ge=-1,
        description="Calls waiting for a replica beyond which new ones are refused (429 with "
        "Retry-After for calls from the Ingress); -1 = unbounded.",
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment variables of the replica processes."
    )

    def ray_options(self) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options(...)`."""
        opts: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
        }
        if self.env:
            opts["ray_actor_options"]["runtime_env"] = {"env_vars": dict(self.env)}
        if self.autoscaling:
            opts["autoscaling_config"] = self.autoscaling.model_dump()
            opts["num_replicas"] = "auto"
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class DeploymentsConfig(BaseModel):
    """Ray options of the five deployments."""

    model_config = ConfigDict(extra="forbid")

    ingress: DeploymentOptions = Field(default_factory=DeploymentOptions)
    router: DeploymentOptions = Field(default_factory=DeploymentOptions)
    retriever: DeploymentOptions = Field(default_factory=DeploymentOptions)
    generator: DeploymentOptions = Field(default_factory=DeploymentOptions)
    steerer: DeploymentOptions = Field(default_factory=DeploymentOptions)


class ServerConfig(BaseModel):
    """HTTP-facing limits and auth of the Ingress."""

    model_config = ConfigDict(extra="forbid")

    api_keys: list[str] = Field(
        default_factory=list,
        description="Bearer keys of the use routes (generation, models, embeddings, files, "
        "vector stores, /docs, /openapi.json); empty = no auth. Admin keys work there too.",
    )
    admin_api_keys: list[str] = Field(
        default_factory=list,
        description="Bearer keys of the routes that change the server: load/unload adapters, "
        "upload/extract/delete steering vectors, delete files and vector stores. Empty = the "
        "api_keys (one tier; none = no auth).",
    )
    state_dir: str | None = Field(
        "~/.cache/tandem/state",
        description="Where adapters loaded through the API are recorded, so every replica "
        "(new, restarted, autoscaled) loads them at start; None = not recorded (a restart "
        "forgets them). Uploaded steering vectors live in steering.vector_dir.",
    )
    max_request_bytes: int = Field(
        1 << 20, ge=1024, description="Largest JSON body (413 beyond); file uploads have their own."
    )
    max_n: int = Field(8, ge=1, description="Largest `n` a request may ask for.")
    default_max_tokens: int = Field(
        64, ge=1, description="Completion tokens when a request gives no max_tokens."
    )
    request_timeout_s: float = Field(
        300, gt=0, description="A request still running after this is aborted."
    )
    stream_interval_s: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Least time between two streamed chunks of one response: the tokens "
        "made meanwhile travel in one chunk (as vLLM's and SGLang's stream_interval). 0 sends "
        "every engine step's tokens at once. Each chunk costs the HTTP proxy and the Ingress "
        "about 0.3 ms of CPU, so under load a few tens of ms buy throughput.",
    )
    max_chunk_rate: float = Field(
        0.0,
        ge=0,
        description="SSE chunks per second an Ingress replica sends over all its streams, at "
        "most; 0 = no limit. With N open streams each one's interval becomes at least "
        "N / max_chunk_rate (tokens made meanwhile go in one chunk), so the per-chunk cost of "
        "Serve's HTTP proxy stays bounded however many clients stream (one Ray item per chunk "
        "per response caps a node at about 2k items/s, PLATFORM.md).",
    )


class TandemConfig(BaseModel):
    """Everything `build_app` needs: serve_config.yaml's `args:`."""

    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    adapters: list[AdapterConfig] = Field(
        default_factory=list, description="LoRA adapters of the big model."
    )
    router: RouterConfig = Field(default_factory=RouterConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    steering: SteeringConfig = Field(default_factory=SteeringConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    activation_store: ActivationStoreConfig = Field(default_factory=ActivationStoreConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    deployments: DeploymentsConfig = Field(default_factory=DeploymentsConfig)


class ConfigError(ValueError):
    """The config does not fit the schema; the message lists every problem by its key path."""


def load_config(args: dict[str, Any] | None) -> TandemConfig:
    """Validate `args` against the schema, with one readable line per problem."""
    try:
        return TandemConfig.model_validate(args or {})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            if err["type"] == "extra_forbidden":
                parent = err["loc"][:-1]
                allowed = _allowed_keys(parent)
                lines.append(f"unknown key '{where}'" + (f"; allowed: {allowed}" if allowed else ""))
            else:
                lines.append(f"{where}: {err['msg']}")
        raise ConfigError("invalid Tandem config:\n  " + "\n  ".join(lines)) from None


def _allowed_keys(path: tuple) -> str:
    """The field names allowed at a key path of the schema, for error messages."""
    model: Any = TandemConfig
    for part in path:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return ""
        ann = field.annotation
        args = getattr(ann, "__args__", ()) or ()
        candidates = [ann, *args]
        model = next((c for c in candidates if hasattr(c, "model_fields")), None)
        if model is None:
            return ""
    return ", ".join(model.model_fields)
