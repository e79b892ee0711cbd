"""The server's settings, typed: from command-line flags, ``CODEACCEL_SERVE_*`` environment variables,
or a JSON/TOML config file (in that order of precedence, then the defaults here)."""

from __future__ import annotations

import json
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from codeaccel.errors import UserError

DEFAULT_MODEL = "qwen2.5-coder-1.5b-instruct"
# the config file's values while load_settings validates (a source below the environment and the flags)
_FILE_VALUES: ContextVar[dict | None] = ContextVar("codeaccel_serve_config_file", default=None)


class _ConfigFile(PydanticBaseSettingsSource):
    """The config file's values (set by :func:`load_settings`), below the environment and the flags."""

    def get_field_value(self, field, field_name: str) -> tuple[Any, str, bool]:
        return (_FILE_VALUES.get() or {}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_FILE_VALUES.get() or {})


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CODEACCEL_SERVE_", extra="forbid")

    model: str = DEFAULT_MODEL  # bundled name, GGUF path or HF directory
    engine: str = "llama.cpp"
    # drafts verified in the batch: the request's own text (context), or also datastores (retrieval); both
    # lossless and free of a draft model (on this CPU the fastest methods measured: docs/benchmarks/context/)
    # draft-model: the draft model's greedy drafts for the whole batch, one draft evaluation per position
    method: Literal["autoregressive", "context", "retrieval", "draft-model"] = "context"
    draft_model: str = "qwen2.5-coder-0.5b-instruct"  # draft-model: bundled name or path (same tokenizer)
    # draft-model: a folder of tuned versions (codeaccel draft): its live version is applied and followed
    draft_versions: Path | None = None
    draft_poll_s: float = Field(5.0, gt=0)  # how often the live version is looked up
    # draft lengths of the batch: chosen together from the cost curve (joint), or each request's as if alone
    draft_lengths: Literal["joint", "per-request"] = "joint"
    datastores: list[Path] = []  # retrieval: datastore directories (codeaccel index build); default: the general one
    model_alias: str | None = None  # the id /v1/models reports (default: the model's name)
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    parallel: int = Field(8, ge=1, le=64)  # sequences decoded together (llama-server's -np)
    ctx_size: int = Field(4096, ge=64)  # most tokens one request may hold: prompt + completion (max_model_len)
    n_threads: int | None = Field(None, ge=1)
    # prompt tokens evaluated per step beside the running requests' tokens (llama-server mixes them likewise)
    prefill_chunk: int = Field(256, ge=1)
    # keep finished requests' caches: a prompt sharing a prefix with one evaluates only the rest (cache_prompt)
    prefix_cache: bool = True
    max_queue: int = Field(64, ge=0)  # requests waiting beyond the running ones before 503
    # completions of greedy or seeded requests kept and answered again without decoding (0: off)
    completion_cache: int = Field(256, ge=0)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    default_max_tokens: int = Field(256, ge=1)  # when a request names none (OpenAI's legacy default is 16)
    api_key: str | None = None  # required as "Authorization: Bearer <key>" when set
    events_db: Path | None = None  # /v1/events store (default: events.sqlite in the codeaccel cache)
    # accepted completions (select events of served choices): sqlite:///PATH, a path, or postgresql://...
    # (default: the events' SQLite file)
    accepted_store: str | None = None
    # tune the draft by itself once this many new accepted completions arrived (0: off; `codeaccel draft train`
    # as a niced child process with its time and memory bounded; needs draft_versions, which it promotes into)
    auto_tune: int = Field(0, ge=0)
    auto_tune_max_seconds: float = Field(900.0, gt=0)  # its training time
    auto_tune_memory_mb: int = Field(8192, ge=256)  # its memory (data segment)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):  # fmt: skip
        """Flags (init), then the environment, then the config file: validated once, on the merged values."""
        return init_settings, env_settings, _ConfigFile(settings_cls)

    @model_validator(mode="after")
    def _draft_versions_need_a_draft(self):
        if self.draft_versions is not None and self.method != "draft-model":
            raise ValueError("draft_versions (a tuned draft to follow) needs method draft-model")
        if self.auto_tune and self.draft_versions is None:
            raise ValueError("auto_tune (tuning the draft by itself) needs draft_versions (where it promotes to)")
        return self


def load_settings(config_file: Path | None = None, **flags) -> ServeSettings:
    """Settings from ``flags`` (None: not given), then the environment, then ``config_file``."""
    values: dict = {}
    if config_file is not None:
        if not config_file.is_file():
            raise UserError(f"config file {config_file} does not exist")
        text = config_file.read_text()
        try:
            values = tomllib.loads(text) if config_file.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            kind = "TOML" if config_file.suffix == ".toml" else "JSON"
            raise UserError(f"config file {config_file} is not valid {kind}: {exc}") from None
        if not isinstance(values, dict):
            raise UserError(f"config file {config_file} must hold a table of settings")
    given = {k: v for k, v in flags.items() if v is not None}
    token = _FILE_VALUES.set(values)
    try:
        return ServeSettings(**given)  # flags over the environment over the file, checked together
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        raise UserError(f"bad setting {where}: {first['msg']}") from None
    finally:
        _FILE_VALUES.reset(token)
