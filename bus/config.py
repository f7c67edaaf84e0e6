"""Settings of the bus section (``PUBRELAY_BUS__*``)."""

from __future__ import annotations

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
        description="sqlite:///path/to/bus.db or kafka://host:port[,host:port]; "
        "empty means sqlite in the data directory",
    )
    topic_prefix: str = DEFAULT_TOPIC_PREFIX
    publish_timeout_s: float = Field(default=5.0, gt=0, le=9.0)

    # embedded (SQLite) bus
    retention_s: float = Field(default=7 * 24 * 3600, gt=0)
    poll_interval_s: float = Field(default=0.5, gt=0, description="cross-process wake-up bound")

    # Kafka bus
    client_id: str = "pubrelay"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    acks: Literal["all", "1", "0"] = Field(
        default="all",
        description="producer acknowledgement; 1 or 0 can lose acknowledged events and "
        "needs ALLOW_UNSAFE_ACKS",
    )
    allow_unsafe_acks: bool = Field(
        default=False,
        description="DANGER: allow ACKS=1 or 0, so a 2xx no longer means the event survives "
        "a broker failure (logged loudly at start)",
    )
    enable_idempotence: bool = True
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"
    linger_ms: int = Field(
        default=2, ge=0, description="measured here: 2 ms beat 5 ms by ~20% at 64 senders"
    )
    max_batch_bytes: int = Field(default=1024 * 1024, gt=0)
    max_record_bytes: int = Field(
        default=1024 * 1024 + RECORD_HEADROOM_BYTES,
        gt=0,
        description="Kafka: the largest record (body, key, headers) the producer sends, and "
        "max.message.bytes of the topics pubrelay creates; at least "
        "PUBRELAY_HTTP__MAX_BODY_BYTES + 65536",
    )
    request_timeout_s: float = Field(default=8.0, gt=0)
    auto_create_topics: bool = True
    partitions: int = Field(default=6, gt=0)
    replication_factor: int = Field(
        default=3,
        gt=0,
        description="replicas of each topic pubrelay creates; a cluster with fewer brokers "
        "stops start-up with a message (a single development broker: 1)",
    )
    min_insync_replicas: int = Field(
        default=2,
        gt=0,
        description="min.insync.replicas of the topics pubrelay creates: replicas that must "
        "have an event before it is acknowledged (at most REPLICATION_FACTOR)",
    )
    kept_topics_retention_s: int | None = Field(
        default=None,
        gt=0,
        description="retention of the quarantine and dead-letter topics pubrelay creates; "
        "empty: kept until deleted (retention.ms=-1)",
    )

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if value and not value.startswith(("sqlite:///", "kafka://")):
            raise ValueError("must start with sqlite:/// or kafka://")
        return value

    @model_validator(mode="after")
    def _durable(self) -> Self:
        if self.acks != "all" and not self.allow_unsafe_acks:
            raise ValueError(
                f"PUBRELAY_BUS__ACKS={self.acks} lets the webhook answer 2xx for an event "
                "that one broker failure loses; keep ACKS=all, or set "
                "PUBRELAY_BUS__ALLOW_UNSAFE_ACKS=true to accept that"
            )
        if self.min_insync_replicas > self.replication_factor:
            raise ValueError(
                f"PUBRELAY_BUS__MIN_INSYNC_REPLICAS={self.min_insync_replicas} is more than "
                f"PUBRELAY_BUS__REPLICATION_FACTOR={self.replication_factor}: no write could "
                "ever be acknowledged (a single development broker: set both to 1)"
            )
        return self

    @property
    def kind(self) -> Literal["sqlite", "kafka"]:
        return "kafka" if self.url.startswith("kafka://") else "sqlite"

    @property
    def kafka_bootstrap(self) -> list[str]:
        return [h for h in self.url.removeprefix("kafka://").split(",") if h]
