-- Contacts, lists and memberships, the suppression list, and CSV import jobs.
--
-- Ids are UUIDv7 (time-ordered): keyset pages ordered by id are stable under inserts (a new
-- contact sorts after every existing one) and an import keeps the file's order.

CREATE TABLE contacts (
    account_id   uuid        NOT NULL,
    id           uuid        NOT NULL DEFAULT uuidv7(),
    -- Normalised: the domain lower-cased, the local part as given. Compared case-insensitively.
    email        text        NOT NULL,
    first_name   text,
    last_name    text,
    attributes   jsonb       NOT NULL DEFAULT '{}'::jsonb,
    status       text        NOT NULL DEFAULT 'active'
                 CHECK (status IN ('active', 'unsubscribed', 'bounced', 'complained')),
    soft_bounces integer     NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    -- (account_id, id) serves every keyset page of an account and every lookup by id.
    PRIMARY KEY (account_id, id)
);

-- One address once per account; text_pattern_ops also serves prefix matches of `q`.
CREATE UNIQUE INDEX contacts_account_email ON contacts (account_id, lower(email) text_pattern_ops);

-- The few contacts that are not active, for `status=` filters that would otherwise scan.
CREATE INDEX contacts_not_active ON contacts (account_id, status, id) WHERE status <> 'active';

CREATE TABLE lists (
    account_id  uuid        NOT NULL,
    id          uuid        NOT NULL DEFAULT uuidv7(),
    name        text        NOT NULL,
    description text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, id)
);

CREATE UNIQUE INDEX lists_account_name ON lists (account_id, lower(name));

-- The foreign keys carry account_id, so a membership can never join two accounts' objects.
CREATE TABLE memberships (
    account_id uuid        NOT NULL,
    list_id    uuid        NOT NULL,
    contact_id uuid        NOT NULL,
    added_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, list_id, contact_id),
    FOREIGN KEY (account_id, list_id) REFERENCES lists (account_id, id) ON DELETE CASCADE,
    FOREIGN KEY (account_id, contact_id) REFERENCES contacts (account_id, id) ON DELETE CASCADE
);

CREATE INDEX memberships_contact ON memberships (account_id, contact_id);

-- Addresses that must never receive campaign mail again, whether or not they are contacts
-- (deleting a contact does not resubscribe them).
CREATE TABLE suppressions (
    account_id  uuid        NOT NULL,
    email_lower text        NOT NULL,
    reason      text        NOT NULL
                CHECK (reason IN ('unsubscribed', 'bounced', 'complained', 'manual')),
    email_id    uuid,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, email_lower)
);

CREATE TABLE import_jobs (
    id             uuid        PRIMARY KEY,
    account_id     uuid        NOT NULL,
    list_id        uuid,
    filename       text,
    status         text        NOT NULL DEFAULT 'queued'
                   CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
    -- The replica that holds the uploaded file and runs the job; it holds an advisory lock
    -- named after this id for as long as it lives, so a job whose runner died is recognisable.
    runner         uuid        NOT NULL,
    rows_read      integer     NOT NULL DEFAULT 0,
    created        integer     NOT NULL DEFAULT 0,
    updated        integer     NOT NULL DEFAULT 0,
    skipped        integer     NOT NULL DEFAULT 0,
    error_count    integer     NOT NULL DEFAULT 0,
    errors         jsonb       NOT NULL DEFAULT '[]'::jsonb,
    failure_reason text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    started_at     timestamptz,
    finished_at    timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX import_jobs_account ON import_jobs (account_id, created_at DESC);
CREATE INDEX import_jobs_active ON import_jobs (runner) WHERE status IN ('queued', 'running');
