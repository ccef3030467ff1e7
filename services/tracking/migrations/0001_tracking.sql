-- What happened to each message after it left: delivery outcomes, provider notifications, opens
-- and clicks, and the roll-ups reports read (never the raw rows).

-- One row per email this service has heard of; `account_id` scopes every read.
CREATE TABLE emails (
    email_id         uuid PRIMARY KEY,
    account_id       uuid        NOT NULL,
    subject          text,
    kind             text,
    tags             text[]      NOT NULL DEFAULT '{}',
    -- Whether Herald added its own pixel and rewrote links (else provider opens/clicks count).
    track_opens      boolean     NOT NULL DEFAULT true,
    track_clicks     boolean     NOT NULL DEFAULT true,
    -- From the scheduler's fan-out: how many recipients were handed out (latest revision).
    total_recipients integer,
    fanout_revision  integer,
    first_sent_at    timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX emails_by_account ON emails (account_id, created_at DESC);
CREATE INDEX emails_by_tag ON emails USING gin (tags);

-- One row per message (one recipient of one email). Opens and clicks name the message, not the
-- address, so a row can exist before the dispatcher's outcome names its recipient.
CREATE TABLE recipients (
    message_id           text PRIMARY KEY,
    email_id             uuid        NOT NULL,
    account_id           uuid        NOT NULL,
    recipient            text,
    contact_id           uuid,
    status               text        NOT NULL DEFAULT 'queued'
                         CHECK (status IN ('queued', 'deferred', 'sent', 'failed')),
    attempts             integer     NOT NULL DEFAULT 0,
    smtp_code            integer,
    smtp_reply           text,
    sent_at              timestamptz,
    confirmed_at         timestamptz,
    provider_status      text,
    bounce               text CHECK (bounce IN ('soft', 'hard')),
    bounced_at           timestamptz,
    bounce_detail        text,
    complained_at        timestamptz,
    unsubscribed_at      timestamptz,
    opens                integer     NOT NULL DEFAULT 0,
    human_opens          integer     NOT NULL DEFAULT 0,
    first_open_at        timestamptz,
    first_human_open_at  timestamptz,
    clicks               integer     NOT NULL DEFAULT 0,
    human_clicks         integer     NOT NULL DEFAULT 0,
    first_click_at       timestamptz,
    first_human_click_at timestamptz,
    updated_at           timestamptz NOT NULL DEFAULT now()
);

-- Outcomes are counted once per (email, recipient); also the order of the per-recipient list.
CREATE UNIQUE INDEX recipients_by_address ON recipients (email_id, recipient)
    WHERE recipient IS NOT NULL;

-- Which links each recipient clicked (unique clicks per link).
CREATE TABLE recipient_links (
    message_id           text    NOT NULL,
    link_index           integer NOT NULL,
    clicks               integer NOT NULL DEFAULT 0,
    human_clicks         integer NOT NULL DEFAULT 0,
    first_click_at       timestamptz,
    first_human_click_at timestamptz,
    PRIMARY KEY (message_id, link_index)
);

-- Every open and click as recorded (for audit and exports; reports never scan it). The id is
-- made when the request is answered, so a flush retried after an unclear commit counts once.
CREATE TABLE activity (
    id         uuid PRIMARY KEY,
    kind       text        NOT NULL CHECK (kind IN ('open', 'click')),
    source     text        NOT NULL,
    message_id text        NOT NULL,
    email_id   uuid        NOT NULL,
    account_id uuid        NOT NULL,
    at         timestamptz NOT NULL,
    link_index integer,
    url        text,
    machine    boolean     NOT NULL,
    reason     text,
    user_agent text,
    ip         text
);

-- Unsubscribes counted once per (email, address), whether or not the address is a known row.
CREATE TABLE unsubscribes (
    email_id   uuid        NOT NULL,
    address    text        NOT NULL,
    account_id uuid        NOT NULL,
    at         timestamptz NOT NULL,
    PRIMARY KEY (email_id, address)
);

-- Provider notifications (SES, SendGrid) as received: deduplicated by the provider's event id,
-- and kept unmatched until the message they name is known.
CREATE TABLE provider_events (
    provider            text        NOT NULL,
    event_id            text        NOT NULL,
    kind                text        NOT NULL,
    message_id          text,
    provider_message_id text,
    recipient           text,
    at                  timestamptz NOT NULL,
    detail              jsonb       NOT NULL DEFAULT '{}'::jsonb,
    matched             boolean     NOT NULL DEFAULT false,
    received_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, event_id)
);

-- A provider names the message by its Message-ID header, `<our id>@<domain>`.
CREATE INDEX provider_events_unmatched ON provider_events (split_part(message_id, '@', 1))
    WHERE NOT matched;
CREATE INDEX provider_events_by_provider_message ON provider_events (provider, provider_message_id)
    WHERE provider_message_id IS NOT NULL AND message_id IS NOT NULL;

-- Roll-up changes made by consumers and webhooks, applied by the flush worker: one writer of
-- the roll-ups, so concurrent transactions never deadlock on them.
CREATE TABLE rollup_deltas (
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    scope      text        NOT NULL CHECK (scope IN ('all', 'stats', 'buckets', 'link')),
    email_id   uuid        NOT NULL,
    account_id uuid        NOT NULL,
    at         timestamptz NOT NULL,
    link_index integer,
    url        text,
    counts     jsonb       NOT NULL
);

-- The roll-ups. Bucket tables count what happened in each UTC hour or day; `email_stats` holds
-- each email's current figures (where `deferred` is recipients deferred now, not deferrals).
CREATE TABLE email_stats (
    email_id            uuid PRIMARY KEY,
    account_id          uuid   NOT NULL,
    sent                bigint NOT NULL DEFAULT 0,
    failed              bigint NOT NULL DEFAULT 0,
    deferred            bigint NOT NULL DEFAULT 0,
    delivered           bigint NOT NULL DEFAULT 0,
    confirmed           bigint NOT NULL DEFAULT 0,
    bounced             bigint NOT NULL DEFAULT 0,
    hard_bounced        bigint NOT NULL DEFAULT 0,
    complained          bigint NOT NULL DEFAULT 0,
    unsubscribed        bigint NOT NULL DEFAULT 0,
    opens               bigint NOT NULL DEFAULT 0,
    human_opens         bigint NOT NULL DEFAULT 0,
    unique_opens        bigint NOT NULL DEFAULT 0,
    unique_human_opens  bigint NOT NULL DEFAULT 0,
    clicks              bigint NOT NULL DEFAULT 0,
    human_clicks        bigint NOT NULL DEFAULT 0,
    unique_clicks       bigint NOT NULL DEFAULT 0,
    unique_human_clicks bigint NOT NULL DEFAULT 0
);

CREATE TABLE email_hourly (
    email_id            uuid        NOT NULL,
    hour                timestamptz NOT NULL,
    account_id          uuid        NOT NULL,
    sent                bigint NOT NULL DEFAULT 0,
    failed              bigint NOT NULL DEFAULT 0,
    deferred            bigint NOT NULL DEFAULT 0,
    delivered           bigint NOT NULL DEFAULT 0,
    confirmed           bigint NOT NULL DEFAULT 0,
    bounced             bigint NOT NULL DEFAULT 0,
    hard_bounced        bigint NOT NULL DEFAULT 0,
    complained          bigint NOT NULL DEFAULT 0,
    unsubscribed        bigint NOT NULL DEFAULT 0,
    opens               bigint NOT NULL DEFAULT 0,
    human_opens         bigint NOT NULL DEFAULT 0,
    unique_opens        bigint NOT NULL DEFAULT 0,
    unique_human_opens  bigint NOT NULL DEFAULT 0,
    clicks              bigint NOT NULL DEFAULT 0,
    human_clicks        bigint NOT NULL DEFAULT 0,
    unique_clicks       bigint NOT NULL DEFAULT 0,
    unique_human_clicks bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (email_id, hour)
);

CREATE INDEX email_hourly_by_account ON email_hourly (account_id, hour);

CREATE TABLE email_daily (
    email_id            uuid   NOT NULL,
    day                 date   NOT NULL,
    account_id          uuid   NOT NULL,
    sent                bigint NOT NULL DEFAULT 0,
    failed              bigint NOT NULL DEFAULT 0,
    deferred            bigint NOT NULL DEFAULT 0,
    delivered           bigint NOT NULL DEFAULT 0,
    confirmed           bigint NOT NULL DEFAULT 0,
    bounced             bigint NOT NULL DEFAULT 0,
    hard_bounced        bigint NOT NULL DEFAULT 0,
    complained          bigint NOT NULL DEFAULT 0,
    unsubscribed        bigint NOT NULL DEFAULT 0,
    opens               bigint NOT NULL DEFAULT 0,
    human_opens         bigint NOT NULL DEFAULT 0,
    unique_opens        bigint NOT NULL DEFAULT 0,
    unique_human_opens  bigint NOT NULL DEFAULT 0,
    clicks              bigint NOT NULL DEFAULT 0,
    human_clicks        bigint NOT NULL DEFAULT 0,
    unique_clicks       bigint NOT NULL DEFAULT 0,
    unique_human_clicks bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (email_id, day)
);

CREATE INDEX email_daily_by_account ON email_daily (account_id, day);

CREATE TABLE account_hourly (
    account_id          uuid        NOT NULL,
    hour                timestamptz NOT NULL,
    sent                bigint NOT NULL DEFAULT 0,
    failed              bigint NOT NULL DEFAULT 0,
    deferred            bigint NOT NULL DEFAULT 0,
    delivered           bigint NOT NULL DEFAULT 0,
    confirmed           bigint NOT NULL DEFAULT 0,
    bounced             bigint NOT NULL DEFAULT 0,
    hard_bounced        bigint NOT NULL DEFAULT 0,
    complained          bigint NOT NULL DEFAULT 0,
    unsubscribed        bigint NOT NULL DEFAULT 0,
    opens               bigint NOT NULL DEFAULT 0,
    human_opens         bigint NOT NULL DEFAULT 0,
    unique_opens        bigint NOT NULL DEFAULT 0,
    unique_human_opens  bigint NOT NULL DEFAULT 0,
    clicks              bigint NOT NULL DEFAULT 0,
    human_clicks        bigint NOT NULL DEFAULT 0,
    unique_clicks       bigint NOT NULL DEFAULT 0,
    unique_human_clicks bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, hour)
);

CREATE TABLE link_stats (
    email_id            uuid    NOT NULL,
    link_index          integer NOT NULL,
    account_id          uuid    NOT NULL,
    url                 text    NOT NULL,
    clicks              bigint  NOT NULL DEFAULT 0,
    human_clicks        bigint  NOT NULL DEFAULT 0,
    unique_clicks       bigint  NOT NULL DEFAULT 0,
    unique_human_clicks bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (email_id, link_index)
);

CREATE TABLE link_hourly (
    email_id            uuid        NOT NULL,
    link_index          integer     NOT NULL,
    hour                timestamptz NOT NULL,
    account_id          uuid        NOT NULL,
    clicks              bigint      NOT NULL DEFAULT 0,
    human_clicks        bigint      NOT NULL DEFAULT 0,
    unique_clicks       bigint      NOT NULL DEFAULT 0,
    unique_human_clicks bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (email_id, link_index, hour)
);

CREATE INDEX link_hourly_by_account ON link_hourly (account_id, hour);

CREATE TABLE link_daily (
    email_id            uuid    NOT NULL,
    link_index          integer NOT NULL,
    day                 date    NOT NULL,
    account_id          uuid    NOT NULL,
    clicks              bigint  NOT NULL DEFAULT 0,
    human_clicks        bigint  NOT NULL DEFAULT 0,
    unique_clicks       bigint  NOT NULL DEFAULT 0,
    unique_human_clicks bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (email_id, link_index, day)
);

CREATE INDEX link_daily_by_account ON link_daily (account_id, day);

-- The account's timezone, for report buckets (a projection of auth's `user.changed`).
CREATE TABLE account_settings (
    account_id uuid PRIMARY KEY,
    timezone   text        NOT NULL DEFAULT 'UTC',
    updated_at timestamptz NOT NULL DEFAULT now()
);
