-- Durable timers (one per email, the latest revision wins) and the progress of each fan-out.

CREATE TABLE timers (
    email_id     uuid PRIMARY KEY,
    account_id   uuid,
    revision     integer     NOT NULL,
    send_at      timestamptz NOT NULL,
    -- The EmailScheduled event as received: what the fan-out hands out.
    payload      jsonb       NOT NULL,
    state        text        NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'fired', 'cancelled')),
    fired_at     timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- The poller's query: due pending timers, oldest first.
CREATE INDEX timers_due ON timers (send_at) WHERE state = 'pending';

-- One row per fired timer. `phase`/`to_offset`/`cursor`/`batch_no`/`total` change in the same
-- transaction as the outbox rows of each batch, so a fan-out resumes exactly where it stopped.
-- `lease_until` keeps other replicas off a fan-out while its worker is alive.
CREATE TABLE fanouts (
    email_id     uuid PRIMARY KEY REFERENCES timers (email_id) ON DELETE CASCADE,
    revision     integer     NOT NULL,
    state        text        NOT NULL DEFAULT 'running'
                 CHECK (state IN ('running', 'completed', 'cancelled', 'failed')),
    phase        text        NOT NULL DEFAULT 'to' CHECK (phase IN ('to', 'contacts')),
    to_offset    integer     NOT NULL DEFAULT 0,
    cursor       text,
    batch_no     integer     NOT NULL DEFAULT 0,
    total        integer     NOT NULL DEFAULT 0,
    attempts     integer     NOT NULL DEFAULT 0,
    owner        uuid,
    lease_until  timestamptz NOT NULL DEFAULT '-infinity',
    last_error   text,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);

CREATE INDEX fanouts_running ON fanouts (lease_until) WHERE state = 'running';
