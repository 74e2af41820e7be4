"""The gateway's own settings, typed, with every default written once, here.

Built once when config.yaml loads (and again when the command line overrides a setting). Channels,
sources, destinations and steps stay mappings: each connector validates and reads its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from gateway.config import rules
from gateway.config.locations import Locations

StoreBackend = Literal["sqlite", "postgresql"]
JournalBackend = Literal["sqlite", "nats"]
Synchronous = Literal["FULL", "NORMAL", "EXTRA"]
DocumentMode = Literal["pdsm", "dmp"]
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Per-client token bucket of the HTTP API (by bearer subject, else address)."""

    requests_per_s: float = 200.0
    burst: int = 400


@dataclass(frozen=True, slots=True)
class HttpSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    enabled: bool = True
    # PEM file paths (cert, key, ca, require_client_cert), relative to the config file.
    tls: Mapping[str, Any] | None = None
    max_body_bytes: int = 32 * 1024 * 1024
    max_header_bytes: int = 8190  # the longest request line or header field
    rate_limit: RateLimit = RateLimit()


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Who may call the HTTP API."""

    tokens: tuple[Mapping[str, Any], ...] = ()
    jwt: Mapping[str, Any] | None = None  # keys (at least one), audience, issuer, leeway_s
    # Where the first-start admin token goes when no admin credential is configured (built
    # under the data_dir in effect, the command line's included).
    admin_token_file: Path = Path("var/admin-token")

    @property
    def has_admin_credential(self) -> bool:
        """Whether some way to act as admin is configured (a static admin token or JWT keys)."""
        return self.jwt is not None or any(t.get("role") == "admin" for t in self.tokens)


@dataclass(frozen=True, slots=True)
class Retention:
    payload_days: float = 30.0
    message_days: float = 90.0
    sweep_interval_s: float = 3600.0


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """The message store: SQLite in data_dir, or PostgreSQL."""

    backend: StoreBackend = "sqlite"
    dsn: str | None = None  # postgresql://USER@HOST:PORT/DB
    schema: str | None = None
    pool_size: int = 8


@dataclass(frozen=True, slots=True)
class JournalSettings:
    """Where appends go: SQLite (one node) or NATS JetStream (several nodes)."""

    backend: JournalBackend = "sqlite"
    url: str | None = None  # nats://HOST:PORT
    stream_prefix: str = "PASSERELLE"
    partitions: int = 32
    dedupe_window_s: float = 120.0
    # A dead node's message goes to another node after this; a live node keeps its own by beating.
    ack_wait_s: float = 5.0
    # The SQLite journal's only:
    synchronous: Synchronous = "FULL"
    max_batch: int = 4096


@dataclass(frozen=True, slots=True)
class ExportSettings:
    """FHIR Bulk Data $export."""

    directory: Path = Path("var/exports")  # built under the data_dir in effect, as admin_token_file
    file_ttl_s: float = 3600.0
    max_running: int = 2


@dataclass(frozen=True, slots=True)
class DocumentSettings:
    """The PDSm/DMP document store."""

    mode: DocumentMode = "pdsm"
    valuesets: str | None = None  # None: the shipped profiles/valuesets


@dataclass(frozen=True, slots=True)
class ConsoleSettings:
    locale: str = "fr-FR"


@dataclass(frozen=True, slots=True)
class Overrides:
    """What the command line sets over config.yaml."""

    data_dir: Path | None = None
    http_port: int | None = None
    workers: int | None = None
    journal_url: str | None = None
    store_dsn: str | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the gateway itself reads from config.yaml."""

    data_dir: Path = Path("./var")
    log_level: str = "info"
    workers: int = 1
    # Added to the worker processes' niceness: the main process (intake, journal, ACKs) is served
    # first when the CPU is short, and the queued deliveries take what is left.
    worker_nice: int = 10
    drain_timeout_s: float = 10.0
    http: HttpSettings = HttpSettings()
    auth: AuthSettings = AuthSettings()
    retention: Retention = Retention()
    store: StoreSettings = StoreSettings()
    journal: JournalSettings = JournalSettings()
    export: ExportSettings = ExportSettings()
    documents: DocumentSettings = DocumentSettings()
    console: ConsoleSettings = ConsoleSettings()
    # The identifier systems every mapping step reads (gateway/mapping/namespaces.py).
    namespaces: Mapping[str, Any] = field(default_factory=dict)


def _section(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    return dict(data.get(key) or {})


def _made(cls: type[_T], values: Mapping[str, Any]) -> _T:
    """``cls(**values)``, an integer written for a float setting taken as a float."""
    defaults = cls()
    return cls(
        **{
            k: float(v) if isinstance(getattr(defaults, k), float) and type(v) is int else v
            for k, v in values.items()
        }
    )


def build(data: Mapping[str, Any], at: Locations, overrides: Overrides | None = None) -> Settings:
    """The settings of schema-valid ``data``; a contradiction between keys is a located ConfigError."""
    over = overrides or Overrides()
    default = Settings()
    data_dir = Path(over.data_dir or data.get("data_dir") or default.data_dir)

    http = _section(data, "http")
    if over.http_port is not None:
        http["port"] = over.http_port
    http["rate_limit"] = _made(RateLimit, _section(http, "rate_limit"))
    if http.get("tls") is not None:
        http["tls"] = dict(http["tls"])

    auth = _section(data, "auth")
    tokens = tuple(dict(t) for t in auth.get("tokens") or ())
    jwt = auth.get("jwt")
    token_file = auth.get("admin_token_file")

    journal = _section(data, "journal")
    store = _section(data, "store")
    if over.journal_url:
        journal.update(backend="nats", url=over.journal_url)
    if over.store_dsn:
        store.update(backend="postgresql", dsn=over.store_dsn)

    export = _section(data, "export")
    directory = export.pop("directory", None)

    settings = Settings(
        data_dir=data_dir,
        log_level=str(data.get("log_level", default.log_level)),
        workers=int(data.get("workers", default.workers) if over.workers is None else over.workers),
        worker_nice=int(data.get("worker_nice", default.worker_nice)),
        drain_timeout_s=float(data.get("drain_timeout_s", default.drain_timeout_s)),
        http=_made(HttpSettings, http),
        auth=AuthSettings(
            tokens=tokens,
            jwt=dict(jwt) if jwt is not None else None,
            admin_token_file=Path(token_file) if token_file else data_dir / "admin-token",
        ),
        retention=_made(Retention, _section(data, "retention")),
        store=_made(StoreSettings, store),
        journal=_made(JournalSettings, journal),
        export=_made(
            ExportSettings, {"directory": Path(directory) if directory else data_dir / "exports", **export}
        ),
        documents=_made(DocumentSettings, _section(data, "documents")),
        console=_made(ConsoleSettings, _section(data, "console")),
        namespaces=dict(data.get("namespaces") or {}),
    )
    rules.check_backends(settings, data, at)
    return settings


def defaults(*, data_dir: Path | None = None) -> Settings:
    """The settings of a configuration that sets nothing, with the command line's data_dir."""
    return build({}, Locations("<defaults>", {}), Overrides(data_dir=data_dir))
