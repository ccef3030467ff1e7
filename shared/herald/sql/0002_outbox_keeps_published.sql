-- Published events are kept for OUTBOX_RETENTION_HOURS instead of deleted, so that what a broker
-- lost (the embedded one keeps nothing across a restart) can be published again. Where each was
-- acknowledged (partition, offset) lets the relay notice a broker whose log went backwards.

ALTER TABLE outbox
    ADD COLUMN published_at    timestamptz,
    ADD COLUMN kafka_partition int,
    ADD COLUMN kafka_offset    bigint;

-- The relay reads only pending rows, oldest first: a partial index keeps that as fast as before,
-- however many published rows are retained.
CREATE INDEX outbox_pending ON outbox (seq) WHERE published_at IS NULL;

-- The retention sweep and `republish --since` select published rows by time, which follows the
-- order rows were written in. BRIN, not btree: marking a row published then adds no btree entry
-- for it (half the cost of the relay's UPDATE, measured).
CREATE INDEX outbox_published_at ON outbox USING brin (published_at);
