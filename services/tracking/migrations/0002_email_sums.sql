-- Each email's hourly roll-up summed over all its hours, with the first and last hour anything
-- of the email was counted in (its links' hours included). A report whose period holds all of
-- an email's hours reads the email as this one row, and its links as their `link_stats` rows,
-- instead of summing its daily and hourly buckets: what a report reads no longer grows with how
-- much each email was opened and clicked. Kept by the same writer as the other roll-ups.
CREATE TABLE email_sums (
    email_id            uuid PRIMARY KEY,
    account_id          uuid        NOT NULL,
    first_hour          timestamptz NOT NULL,
    last_hour           timestamptz NOT NULL,
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

-- A report looks for the emails counted in its period: last hour at or after its start.
CREATE INDEX email_sums_by_account ON email_sums (account_id, last_hour);

-- The top links of the emails read whole: the account's links in click order, walked until
-- enough of them belong to such emails.
CREATE INDEX link_stats_top ON link_stats (account_id, clicks DESC, email_id, link_index);

INSERT INTO email_sums (
    email_id, account_id, first_hour, last_hour, sent, failed, deferred, delivered, confirmed,
    bounced, hard_bounced, complained, unsubscribed, opens, human_opens, unique_opens,
    unique_human_opens, clicks, human_clicks, unique_clicks, unique_human_clicks
)
SELECT b.email_id, b.account_id, b.first_hour, b.last_hour,
       coalesce(s.sent, 0), coalesce(s.failed, 0), coalesce(s.deferred, 0),
       coalesce(s.delivered, 0), coalesce(s.confirmed, 0), coalesce(s.bounced, 0),
       coalesce(s.hard_bounced, 0), coalesce(s.complained, 0), coalesce(s.unsubscribed, 0),
       coalesce(s.opens, 0), coalesce(s.human_opens, 0), coalesce(s.unique_opens, 0),
       coalesce(s.unique_human_opens, 0), coalesce(s.clicks, 0), coalesce(s.human_clicks, 0),
       coalesce(s.unique_clicks, 0), coalesce(s.unique_human_clicks, 0)
FROM (
    SELECT email_id, min(account_id::text)::uuid AS account_id,
           min(hour) AS first_hour, max(hour) AS last_hour
    FROM (SELECT email_id, account_id, hour FROM email_hourly
          UNION ALL
          SELECT email_id, account_id, hour FROM link_hourly) AS hours
    GROUP BY email_id
) AS b
LEFT JOIN (
    SELECT email_id,
           sum(sent) AS sent, sum(failed) AS failed, sum(deferred) AS deferred,
           sum(delivered) AS delivered, sum(confirmed) AS confirmed, sum(bounced) AS bounced,
           sum(hard_bounced) AS hard_bounced, sum(complained) AS complained,
           sum(unsubscribed) AS unsubscribed, sum(opens) AS opens,
           sum(human_opens) AS human_opens, sum(unique_opens) AS unique_opens,
           sum(unique_human_opens) AS unique_human_opens, sum(clicks) AS clicks,
           sum(human_clicks) AS human_clicks, sum(unique_clicks) AS unique_clicks,
           sum(unique_human_clicks) AS unique_human_clicks
    FROM email_hourly
    GROUP BY email_id
) AS s ON s.email_id = b.email_id;
