"""Service configuration: one pydantic-settings object, read from ``GPTSERVE_*`` variables.

The CLI (``gptserve serve --help``) mirrors every field as a flag; flags win over
the environment. ``get_settings()`` is cached so that tests can override it.
"""

from __future__ import annotations

import functools
import re
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model.registry import DEFAULT_MODEL

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
KVDtype = Literal["auto", "float32", "bfloat16", "float16"]
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

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,3})?)$")


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
        max_length=256,
        description="name clients use in `model` (default: --model)",
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

    # -- engine (mirrors EngineConfig)
    max_num_seqs: int = Field(
        default=64, ge=1, le=4096, description="sequences decoded together in one step"
    )
    max_batched_tokens: int = Field(
        default=512, ge=1, le=1_048_576, description="token budget of one engine step"
    )
    block_size: int = Field(default=16, ge=1, le=1024, description="KV cache block size in tokens")
    kv_cache_tokens: int | None = Field(
        default=None,
        ge=1,
        le=1 << 30,
        description="KV cache size in tokens (default: from memory fraction on CUDA, 32768 on CPU)",
    )
    kv_cache_memory_fraction: float = Field(
        default=0.85,
        gt=0.0,
        le=1.0,
        description="share of free accelerator memory the KV cache may take",
    )
    max_queue_requests: int = Field(
        default=256, ge=1, le=1_000_000, description="waiting requests before 429"
    )
    max_queue_tokens: int = Field(
        default=1_000_000, ge=1, le=1 << 34, description="waiting prompt tokens before 429"
    )
    max_model_len: int | None = Field(
        default=None,
        ge=1,
        le=1 << 24,
        description="context length (default: the model's, clamped to the KV cache)",
    )
    kv_cache_dtype: KVDtype = Field(
        default="auto",
        description="KV cache dtype (auto: the model's; float16/bfloat16 halve it, not exact)",
    )
    enable_prefix_caching: bool = Field(
        default=True, description="share KV blocks of identical prompt prefixes"
    )
    cuda_graphs: bool = Field(
        default=True, description="capture the decode step in CUDA graphs (CUDA only)"
    )

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

    # -- security and operations
    api_key: SecretStr | None = Field(
        default=None,
        description="bearer key(s), comma-separated; when set, all routes but /health, /ready, /metrics need one",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="allowed CORS origins, comma-separated (empty: CORS off)"
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
        if self.max_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_batched_tokens ({self.max_batched_tokens}) must be at least max_num_seqs ({self.max_num_seqs})"
            )
        return self

    @property
    def model_name(self) -> str:
        """The name clients send in ``model`` and see in responses."""
        return self.served_model_name or self.model

    @property
    def api_keys(self) -> list[str]:
        if self.api_key is None:
            return []
        return _split_keys(self.api_key.get_secret_value())

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``EngineConfig``."""
        names = (
            "max_num_seqs",
            "max_batched_tokens",
            "block_size",
            "kv_cache_tokens",
            "kv_cache_memory_fraction",
            "max_queue_requests",
            "max_queue_tokens",
            "max_model_len",
            "kv_cache_dtype",
            "enable_prefix_caching",
            "cuda_graphs",
        )
        return {name: getattr(self, name) for name in names}


def _split_keys(raw: str) -> list[str]:
    return [key.strip() for key in raw.split(",") if key.strip()]


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings from the environment (cached; ``cache_clear()`` in tests)."""
    return Settings()
