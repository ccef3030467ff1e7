"""Settings of the scheduler service."""

from pydantic import Field

from herald.settings import SERVICE_PORTS, BaseServiceSettings


class Settings(BaseServiceSettings):
    service_name: str = "scheduler"
    port: int = Field(SERVICE_PORTS["scheduler"], validation_alias="SCHEDULER_PORT")
    contacts_url: str = Field("http://127.0.0.1:8002", validation_alias="CONTACTS_URL")
    # How often due timers are looked for; timers fire at most this late (plus a transaction).
    poll_interval_seconds: float = Field(
        0.25, gt=0, le=1.0, validation_alias="SCHEDULER_POLL_INTERVAL"
    )
    # Recipients per DispatchBatch, and per page asked of the contacts service (at most 5000).
    batch_size: int = Field(500, ge=1, le=5000, validation_alias="SCHEDULER_BATCH_SIZE")
    # How long a fan-out stays with a replica that stopped renewing it (crashed), before another
    # replica resumes it from its last committed batch.
    fanout_lease_seconds: float = Field(
        15.0, ge=1.0, le=600.0, validation_alias="SCHEDULER_FANOUT_LEASE_SECONDS"
    )
    # Fan-outs one replica runs at the same time.
    fanout_concurrency: int = Field(4, ge=1, le=64, validation_alias="SCHEDULER_FANOUT_CONCURRENCY")
    contacts_timeout_seconds: float = Field(
        30.0, gt=0, validation_alias="SCHEDULER_CONTACTS_TIMEOUT"
    )
