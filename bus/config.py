"""Settings of the bus section (``PUBRELAY_BUS__*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Final, Literal, Self

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator

from schemas.topics import DEFAULT_TOPIC_PREFIX

RECORD_HEADROOM_BYTES: Final = 64 * 1024
"""Room a record needs beside its body: the key, the headers (ids and type from the body,
``received-at``, the signature and content type as received, which aiohttp caps at 8 KiB
each, a quarantine reason and detail) and the batch framing. A Kafka record may be as large
as ``max_record_bytes``, so the intake's body limit is at most that minus this headroom."""


class BusSettings(BaseModel):
    """Where events are stored: ``sqlite:///path`` (embedded default) or ``kafka://h:p[,h:p]``."""

    url: str = Field(
        default="",
        examples=["kafka://127.0.0.1:9092"],
        description=(
            "`sqlite:///relative/path`, `sqlite:////absolute/path` or "
            "`kafka://host:port[,host:port]` (no credentials: the `SASL_*` settings); "
            "empty: `<data dir>/bus.sqlite3`"
        ),
    )
    topic_prefix: str = Field(
        default=DEFAULT_TOPIC_PREFIX, description="topic = prefix + event type"
    )
    publish_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=9.0,
        description=(
            "longest wait for the bus's acknowledgement (at most 9; it plus "
            "`PUBRELAY_HTTP__BODY_READ_TIMEOUT_S` must stay under Voucherify's 10 s)"
        ),
    )

    # embedded (SQLite) bus
    retention_s: float = Field(
        default=7 * 24 * 3600,
        gt=0,
        description=(
            "embedded bus: records older than this are deleted once every consumer "
            "group of their topic is past them, but a group not seen for this long (a "
            "handler disabled, a worker stopped) no longer holds them, as on Kafka "
            "(`bus_retention_passed_silent_group` in the log); topics no group reads: by "
            "age, but quarantine and dead letters are kept"
        ),
    )
    poll_interval_s: float = Field(
        default=0.5,
        gt=0,
        description="embedded bus: how soon records written by another process are seen",
    )

    # Kafka bus
    client_id: str = Field(default="pubrelay", description="Kafka client id")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="`PLAINTEXT`, `SSL`, `SASL_PLAINTEXT`, `SASL_SSL`"
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        default=None, description="`PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`"
    )
    sasl_username: str | None = Field(
        default=None, description="SASL user (Confluent Cloud: the API key)"
    )
    sasl_password: SecretStr | None = Field(
        default=None, description="SASL password (Confluent Cloud: the API secret); never logged"
    )
    ssl_cafile: str | None = Field(
        default=None, description="CA bundle for `SSL` / `SASL_SSL` (system CAs when empty)"
    )
    ssl_certfile: str | None = Field(
        default=None, description="client certificate (mutual TLS, e.g. Amazon MSK)"
    )
    ssl_keyfile: str | None = Field(default=None, description="client key (mutual TLS)")
    acks: Literal["all", "1", "0"] = Field(
        default="all",
        description=(
            "producer acknowledgement; `1` or `0` can lose events already answered "
            "2xx and stop start-up unless `ALLOW_UNSAFE_ACKS` is set (and "
            "`ENABLE_IDEMPOTENCE=false`: an idempotent producer needs `all`)"
        ),
    )
    allow_unsafe_acks: bool = Field(
        default=False,
        description=(
            "DANGER: allow `ACKS=1` or `0`: a 2xx no longer means the event survives "
            "the loss of a broker (logged as a `bus_unsafe_acks` warning at every "
            "start)"
        ),
    )
    enable_idempotence: bool = Field(
        default=True,
        description=(
            "idempotent producer (aiokafka's); a broker without support stops start-up "
            "with a message saying to set it to `false`. With `false` (and `ACKS` `all` "
            "or `1`) pubrelay sends produce requests of its own, about a tenth less work "
            "per event (see docs/performance.md)"
        ),
    )
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        default="none", description="`gzip`, `snappy`, `lz4`, `zstd`"
    )
    linger_ms: int = Field(
        default=0,
        ge=0,
        description=(
            "how long records wait to be gathered into a batch before it is sent; at 0 "
            "each loop turn's records go together, and more gather while the previous "
            "batch is acknowledged (2 ms cost ~30% of the requests/s at 64 concurrent "
            "senders here)"
        ),
    )
    max_batch_bytes: int = Field(
        default=1024 * 1024,
        gt=0,
        description=(
            "producer batch size (aiokafka's 16 KiB default holds only three or four "
            "events and cut throughput by ~3x here); keep it at most the brokers' "
            "`message.max.bytes`"
        ),
    )
    max_record_bytes: int = Field(
        default=1024 * 1024 + RECORD_HEADROOM_BYTES,
        gt=0,
        description=(
            "the largest record (body, key, headers) the producer sends, and "
            "`max.message.bytes` of the topics pubrelay creates; at least "
            "`PUBRELAY_HTTP__MAX_BODY_BYTES` + 65536 (checked at start)"
        ),
    )
    request_timeout_s: float = Field(default=8.0, gt=0, description="Kafka request timeout")
    auto_create_topics: bool = Field(
        default=True,
        description=(
            "create missing topics at start and on first use; `false`: stop naming "
            "the missing topic"
        ),
    )
    partitions: int = Field(default=6, gt=0, description="partitions of topics pubrelay creates")
    replication_factor: int = Field(
        default=3,
        gt=0,
        description=(
            "replicas of each topic pubrelay creates; a cluster with fewer live "
            "brokers stops start-up with a message (exit 2). A single development "
            "broker: `1`, with `MIN_INSYNC_REPLICAS=1`"
        ),
    )
    min_insync_replicas: int = Field(
        default=2,
        gt=0,
        description=(
            "`min.insync.replicas` of the topics pubrelay creates: with `acks=all` an"
            " event is acknowledged once on this many brokers (at most "
            "`REPLICATION_FACTOR`)"
        ),
    )
    kept_topics_retention_s: int | None = Field(
        default=None,
        gt=0,
        description=(
            "retention of the quarantine and dead-letter records, on Kafka (the topics "
            "pubrelay creates) and on the embedded bus, released or not; empty: kept "
            "until someone deletes them (`retention.ms=-1`)"
        ),
    )

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if value and not value.startswith(("sqlite:///", "kafka://")):
            raise ValueError("must start with sqlite:/// or kafka://")
        if value == "sqlite:///":
            raise ValueError("sqlite:/// needs a file path (empty: <data dir>/bus.sqlite3)")
        if value.startswith("kafka://") and not value.removeprefix("kafka://").strip(", "):
            raise ValueError("kafka:// needs at least one host:port")
        if value.startswith("kafka://") and "@" in value:
            # Messages name the bus by its URL: a password in it would be printed.
            raise ValueError(
                "must not hold credentials: set PUBRELAY_BUS__SASL_MECHANISM, "
                "PUBRELAY_BUS__SASL_USERNAME and PUBRELAY_BUS__SASL_PASSWORD instead"
            )
        return value

    @model_validator(mode="after")
    def _durable(self) -> Self:
        if self.acks != "all" and not self.allow_unsafe_acks:
            raise ValueError(
                f"PUBRELAY_BUS__ACKS={self.acks} lets the webhook answer 2xx for an event "
                "that one broker failure loses; keep ACKS=all, or set "
                "PUBRELAY_BUS__ALLOW_UNSAFE_ACKS=true to accept that"
            )
        if self.acks != "all" and self.enable_idempotence:
            raise ValueError(
                f"PUBRELAY_BUS__ACKS={self.acks} needs PUBRELAY_BUS__ENABLE_IDEMPOTENCE=false: "
                "an idempotent producer is only possible with ACKS=all"
            )
        if self.min_insync_replicas > self.replication_factor:
            raise ValueError(
                f"PUBRELAY_BUS__MIN_INSYNC_REPLICAS={self.min_insync_replicas} is more than "
                f"PUBRELAY_BUS__REPLICATION_FACTOR={self.replication_factor}: no write could "
                "ever be acknowledged (a single development broker: set both to 1)"
            )
        if self.kind == "kafka":
            self._kafka_client_usable()
        return self

    def _kafka_client_usable(self) -> None:
        """What the Kafka client would refuse at start, said when the settings are read
        (so ``pubrelay config --check`` says it too)."""
        protocol = self.security_protocol
        if protocol.startswith("SASL_"):
            missing = [
                f"PUBRELAY_BUS__{name.upper()}"
                for name in ("sasl_mechanism", "sasl_username", "sasl_password")
                if getattr(self, name) is None
            ]
            if missing:
                names = ", ".join(missing[:-1]) + " and " if len(missing) > 1 else ""
                raise ValueError(
                    f"{names}{missing[-1]} {'are' if len(missing) > 1 else 'is'} required "
                    f"with PUBRELAY_BUS__SECURITY_PROTOCOL={protocol}"
                )
        if protocol in ("SSL", "SASL_SSL"):
            for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
                path = getattr(self, name)
                if path is not None and not Path(path).is_file():
                    raise ValueError(f"PUBRELAY_BUS__{name.upper()}={path}: no such file")
            if self.ssl_keyfile is not None and self.ssl_certfile is None:
                raise ValueError("PUBRELAY_BUS__SSL_KEYFILE needs PUBRELAY_BUS__SSL_CERTFILE")
        if self.compression != "none" and not _has_codec(self.compression):
            raise ValueError(
                f"PUBRELAY_BUS__COMPRESSION={self.compression} needs the cramjam package, "
                "which is not installed (pip install cramjam); gzip needs nothing"
            )

    @property
    def kind(self) -> Literal["sqlite", "kafka"]:
        return "kafka" if self.url.startswith("kafka://") else "sqlite"

    @property
    def kafka_bootstrap(self) -> list[str]:
        return [h for h in self.url.removeprefix("kafka://").split(",") if h]


def _has_codec(name: str) -> bool:
    """Whether aiokafka can compress with ``name`` here."""
    from aiokafka import codec  # noqa: PLC0415 - only a Kafka bus with compression needs it

    has: bool = getattr(codec, f"has_{name}")()
    return has
