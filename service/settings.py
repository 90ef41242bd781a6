"""Service configuration: one pydantic-settings object, read from ``GPTSERVE_*`` variables.

The CLI (``gptserve serve --help``) mirrors every field as a flag; flags win over
the environment. The engine section comes from ``EngineConfig``: each of its
settable fields gives its default, description and bounds here.
``get_settings()`` is cached so that tests can override it.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model.registry import DEFAULT_MODEL
from service.engine.config import EngineConfig, KVCacheDtype, settings_fields

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Weights = Literal["auto", "float", "int8", "int4"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]

# Hard ceilings: the request schemas are declared with these bounds, so the
# configurable limits below may only tighten them.
HARD_MAX_TOKENS = 1_048_576
HARD_MAX_STOP = 64
HARD_MAX_STOP_LENGTH = 4096
HARD_MAX_N = 128
HARD_MAX_LOGPROBS = 20
HARD_MAX_BATCH = 2048
MAX_SERVED_NAMES = 16

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,3})?)$")


def _engine_field(name: str) -> Any:
    """The Settings field of an EngineConfig setting: its default, description and bounds."""
    [spec] = [f for f in settings_fields() if f.name == name]
    bounds = {k: v for k, v in spec.metadata.items() if k != "description"}
    return Field(default=spec.default, description=spec.metadata["description"], **bounds)


class Settings(BaseSettings):
    """Everything an operator can set. Each field has a ``GPTSERVE_<NAME>`` variable."""

    model_config = SettingsConfigDict(
        env_prefix="GPTSERVE_", extra="ignore", validate_default=True, allow_inf_nan=False
    )

    # -- model and placement
    model: str = Field(
        default=DEFAULT_MODEL,
        min_length=1,
        description="model to serve: a known name, a Hugging Face checkpoint directory or a GGUF file",
    )
    served_model_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=2048,
        description="name clients use in `model` (default: the model file's stem or the "
        "directory's name); several aliases separated by commas, the first shown in responses",
    )
    dtype: Dtype = Field(
        default="auto",
        description="weight and activation dtype (auto: bfloat16 on CUDA, float32 on CPU)",
    )
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N or mps")
    weights: Weights = Field(
        default="auto",
        description="auto: keep a GGUF file's quantized blocks on the CPU (float on CUDA); "
        "float: dequantize; int8, int4: quantize float weights (CPU)",
    )

    # -- network
    host: str = Field(default="127.0.0.1", min_length=1, description="address to bind")
    port: int = Field(default=8000, ge=1, le=65535, description="port to bind")

    # -- engine: names and types listed here, default, description and bounds from EngineConfig
    max_num_seqs: int = _engine_field("max_num_seqs")
    max_batched_tokens: int = _engine_field("max_batched_tokens")
    block_size: int = _engine_field("block_size")
    kv_cache_tokens: int | None = _engine_field("kv_cache_tokens")
    kv_cache_memory_fraction: float = _engine_field("kv_cache_memory_fraction")
    max_queue_requests: int = _engine_field("max_queue_requests")
    max_queue_tokens: int = _engine_field("max_queue_tokens")
    max_model_len: int | None = _engine_field("max_model_len")
    kv_cache_dtype: KVCacheDtype = _engine_field("kv_cache_dtype")
    enable_prefix_caching: bool = _engine_field("enable_prefix_caching")
    cuda_graphs: bool = _engine_field("cuda_graphs")
    structured_compile_timeout: float = _engine_field("structured_compile_timeout")
    structured_cache_size: int = _engine_field("structured_cache_size")

    # -- request limits
    max_body_bytes: int = Field(
        default=1 << 20, ge=1024, le=1 << 30, description="largest request body (413 above)"
    )
    max_prompt_tokens: int | None = Field(
        default=None,
        ge=1,
        le=1 << 24,
        description="longest prompt in tokens (default: the context length)",
    )
    max_tokens_limit: int = Field(
        default=4096,
        ge=1,
        le=HARD_MAX_TOKENS,
        description="largest max_tokens a request may ask for",
    )
    default_max_tokens: int = Field(
        default=16,
        ge=1,
        le=HARD_MAX_TOKENS,
        description="max_tokens of /generate and /v1/completions when omitted",
    )
    max_stop: int = Field(default=8, ge=0, le=HARD_MAX_STOP, description="stop strings per request")
    max_stop_length: int = Field(
        default=256, ge=1, le=HARD_MAX_STOP_LENGTH, description="characters per stop string"
    )
    max_n: int = Field(
        default=8, ge=1, le=HARD_MAX_N, description="choices per prompt (OpenAI `n`)"
    )
    max_prompts: int = Field(
        default=16, ge=1, le=HARD_MAX_BATCH, description="prompts in one /v1/completions request"
    )
    max_logprobs: int = Field(
        default=20, ge=0, le=HARD_MAX_LOGPROBS, description="top logprobs per token"
    )
    max_embed_batch: int = Field(
        default=64, ge=1, le=HARD_MAX_BATCH, description="inputs in one embedding request"
    )
    max_header_bytes: int = Field(
        default=16384,
        ge=1024,
        le=1 << 22,
        description="largest request headers in bytes (431 above)",
    )
    max_header_count: int = Field(
        default=100, ge=8, le=10_000, description="most headers in one request (431 above)"
    )
    request_timeout: float = Field(
        default=15.0,
        gt=0.0,
        le=3600.0,
        description="seconds a client has to send a whole request, head and body (408 or close after)",
    )
    max_connections: int = Field(
        default=512, ge=1, le=1_000_000, description="open connections (more are closed at once)"
    )

    # -- security and operations
    api_key: SecretStr | None = Field(
        default=None,
        description="bearer key(s), comma-separated; when set, all routes but /health, /ready, /metrics and the web UI's pages need one",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="allowed CORS origins, comma-separated (empty: CORS off)"
    )
    web_ui: bool = Field(
        default=True,
        description="serve the playground at / and the API docs at /docs, /redoc and /openapi.json",
    )
    drain_timeout: float = Field(
        default=30.0, ge=0.0, le=3600.0, description="seconds in-flight requests get after SIGTERM"
    )
    log_prompts: bool = Field(
        default=False, description="log prompt text (off: only ids, sizes and timings)"
    )
    log_level: LogLevel = Field(default="info", description="log level")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N, got {value!r}")
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("api_key")
    @classmethod
    def _check_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _split_keys(value.get_secret_value()):
            raise ValueError("api_key is set but holds no key")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit ({self.max_tokens_limit})"
            )
        # The engine's own rules (bounds, one setting against another), checked here so that
        # a bad combination fails at start-up, naming the settings, not at model load.
        EngineConfig(**self.engine_kwargs())
        return self

    @property
    def model_name(self) -> str:
        """The name clients see in responses (the first alias)."""
        return self.served_names[0]

    @property
    def served_names(self) -> list[str]:
        """Every name clients may send in ``model`` (``--served-model-name a,b``); by
        default the model file's stem (``/models/x.gguf`` -> ``x``), so that no path on
        the host shows in responses, error messages or metric labels."""
        names = [n.strip() for n in (self.served_model_name or "").split(",") if n.strip()]
        if names:
            return names[:MAX_SERVED_NAMES]
        path = Path(self.model)
        return [path.stem if path.suffix.lower() == ".gguf" else path.name or self.model]

    @property
    def api_keys(self) -> list[str]:
        if self.api_key is None:
            return []
        return _split_keys(self.api_key.get_secret_value())

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``EngineConfig``."""
        return {f.name: getattr(self, f.name) for f in settings_fields()}


def _split_keys(raw: str) -> list[str]:
    return [key.strip() for key in raw.split(",") if key.strip()]


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings from the environment (cached; ``cache_clear()`` in tests)."""
    return Settings()
