-- The dispatcher's delivery queue: each email's content once, and one record per recipient.

-- What DispatchBatch carried about the email itself, once per schedule (revision) of it.
CREATE TABLE email_contents (
    email_id      uuid        NOT NULL,
    revision      integer     NOT NULL,
    account_id    uuid        NOT NULL,
    kind          text        NOT NULL CHECK (kind IN ('campaign', 'transactional', 'system')),
    content       jsonb       NOT NULL,
    template_vars jsonb       NOT NULL DEFAULT '{}'::jsonb,
    received_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (email_id, revision)
);

-- One message per (email, recipient): the id is the Message-ID's left part and the `m` of
-- tracking links. State machine: queued -> sending -> sent | deferred | failed, and deferred
-- -> sending when due. `sending` belongs to `claimed_by` (a live dispatcher process holds an
-- advisory lock on it); `handed_over_at` says the relay was given the end of the message.
CREATE TABLE messages (
    id              uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    email_id        uuid        NOT NULL,
    revision        integer     NOT NULL,
    account_id      uuid        NOT NULL,
    recipient       text        NOT NULL,
    contact_id      uuid,
    first_name      text,
    last_name       text,
    attributes      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    state           text        NOT NULL DEFAULT 'queued'
                    CHECK (state IN ('queued', 'sending', 'sent', 'deferred', 'failed')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    claimed_by      uuid,
    handed_over_at  timestamptz,
    smtp_code       integer,
    smtp_reply      text,
    queued_at       timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    FOREIGN KEY (email_id, revision) REFERENCES email_contents (email_id, revision)
) WITH (fillfactor = 80);

-- A recipient gets one copy of an email, whatever Kafka redelivers or schedules repeat.
CREATE UNIQUE INDEX messages_one_per_recipient ON messages (email_id, lower(recipient));
CREATE INDEX messages_due ON messages (next_attempt_at) WHERE state IN ('queued', 'deferred');
CREATE INDEX messages_in_flight ON messages (claimed_by) WHERE state = 'sending';
CREATE INDEX messages_finished ON messages (finished_at) WHERE finished_at IS NOT NULL;

-- New messages wake the dispatchers listening (they also poll, for due retries).
CREATE FUNCTION messages_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '_messages', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER messages_notify AFTER INSERT ON messages
    FOR EACH STATEMENT EXECUTE FUNCTION messages_notify();
