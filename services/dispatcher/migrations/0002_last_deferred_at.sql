-- When a message was last deferred, so the administrators' system view can count deferrals in
-- the last minute and hour: `next_attempt_at` says when the next try is due, not when the last
-- one was put off. The partial index holds only messages ever deferred, a small share of all.
ALTER TABLE messages ADD COLUMN last_deferred_at timestamptz;
CREATE INDEX messages_deferred ON messages (last_deferred_at) WHERE last_deferred_at IS NOT NULL;
