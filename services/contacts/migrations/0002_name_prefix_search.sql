-- `q` matches a prefix of the address, the first name or the last name. The address already has
-- a prefix index (contacts_account_email); these two let a rare prefix be answered by a BitmapOr
-- of three index ranges instead of a walk over every contact of the account.
CREATE INDEX contacts_account_first_name ON contacts (account_id, lower(first_name) text_pattern_ops);
CREATE INDEX contacts_account_last_name ON contacts (account_id, lower(last_name) text_pattern_ops);
