-- Emails (drafts, content, audience, status and counts), the sender identities they go out
-- under (a projection of auth's `user.changed`), and the final outcome per recipient.

CREATE TABLE senders (
    account_id          uuid PRIMARY KEY,
    email               text        NOT NULL,
    email_verified      boolean     NOT NULL DEFAULT false,
    default_sender_name text,
    reply_to            text,
    timezone            text        NOT NULL DEFAULT 'UTC',
    status              text        NOT NULL DEFAULT 'active',
    -- NULL: no daily limit.
    daily_send_quota    integer,
    updated_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE emails (
    id               uuid PRIMARY KEY,
    account_id       uuid        NOT NULL,
    kind             text        NOT NULL
                     CHECK (kind IN ('campaign', 'transactional', 'system', 'test')),
    status           text        NOT NULL DEFAULT 'draft'
                     CHECK (status IN ('draft', 'scheduled', 'queued', 'sending', 'sent',
                                       'cancelled', 'failed')),
    -- Bumped by every schedule, send and cancel; the scheduler keeps the latest.
    revision         integer     NOT NULL DEFAULT 0,
    subject          text        NOT NULL,
    html             text,
    text             text,
    -- The text part was derived from the HTML (and is derived again when the HTML changes).
    text_derived     boolean     NOT NULL DEFAULT false,
    from_name        text,
    from_email       text,
    reply_to         text,
    list_ids         uuid[]      NOT NULL DEFAULT '{}',
    contact_ids      uuid[]      NOT NULL DEFAULT '{}',
    to_addresses     text[]      NOT NULL DEFAULT '{}',
    tags             text[]      NOT NULL DEFAULT '{}',
    template_vars    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    idempotency_key  text,
    test_of          uuid REFERENCES emails (id) ON DELETE SET NULL,
    send_at          timestamptz,
    -- The account's day (in its timezone) the email counts against the daily quota, and how
    -- many recipients it was counted for when it was queued.
    quota_day        date,
    reserved         integer     NOT NULL DEFAULT 0,
    -- Set when the scheduler's fan-out ends: how many recipients were handed out.
    recipients       integer,
    sent_count       integer     NOT NULL DEFAULT 0,
    failed_count     integer     NOT NULL DEFAULT 0,
    failure_reason   text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    queued_at        timestamptz,
    completed_at     timestamptz
);

CREATE UNIQUE INDEX emails_idempotency ON emails (account_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX emails_listing ON emails (account_id, created_at DESC, id DESC);
CREATE INDEX emails_quota ON emails (account_id, quota_day) WHERE quota_day IS NOT NULL;

-- One final outcome per recipient of an email, so a repeated event is counted once.
CREATE TABLE outcomes (
    email_id   uuid        NOT NULL REFERENCES emails (id) ON DELETE CASCADE,
    recipient  text        NOT NULL,
    status     text        NOT NULL CHECK (status IN ('sent', 'failed')),
    at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (email_id, recipient)
);
