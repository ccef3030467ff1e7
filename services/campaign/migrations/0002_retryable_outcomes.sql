-- Whether a recipient's failure may be cured by trying again (the dispatcher gave up on
-- temporary trouble), so that "retry failed recipients" knows before it asks whether there is
-- anything to retry. NULL: recorded before this was known; treated as retryable, as it was.
ALTER TABLE outcomes ADD COLUMN retryable boolean;
