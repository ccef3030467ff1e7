"""Settings of the contacts service."""

import tempfile
from pathlib import Path

from pydantic import Field

from herald.settings import SERVICE_PORTS, BaseServiceSettings


class Settings(BaseServiceSettings):
    service_name: str = "contacts"
    port: int = Field(SERVICE_PORTS["contacts"], validation_alias="CONTACTS_PORT")
    # Where uploaded CSV files wait for their import (local disk of this replica).
    import_dir: str = Field(
        str(Path(tempfile.gettempdir()) / "herald-contacts-imports"),
        validation_alias="CONTACTS_IMPORT_DIR",
    )
    import_max_bytes: int = Field(1 << 30, ge=1024, validation_alias="CONTACTS_IMPORT_MAX_BYTES")
    import_concurrency: int = Field(2, ge=1, le=16, validation_alias="CONTACTS_IMPORT_CONCURRENCY")
    import_chunk_rows: int = Field(
        20_000, ge=100, le=200_000, validation_alias="CONTACTS_IMPORT_CHUNK_ROWS"
    )
    # How many row errors a job keeps to show (all are counted).
    import_keep_errors: int = Field(100, ge=1, le=10_000, validation_alias="CONTACTS_IMPORT_ERRORS")
    import_reap_interval: float = Field(
        30.0, gt=0, validation_alias="CONTACTS_IMPORT_REAP_INTERVAL"
    )
