-- `q` finds a prefix of the first or the last name through one GIN index instead of two B-trees:
-- every index costs each imported row an insertion. Inserting a million contacts took 3.5 s of
-- CPU more with the two name B-trees (their posting lists of repeated names rewritten row by
-- row) and 2.0 s more with this one index, whose pending list takes rows in batches.
--
-- Its entries are the lower-cased names, each after the account id, so a prefix search stays
-- inside one account. Lexemes are compared byte-wise and a `:*` query matches by byte prefix:
-- the same answer as starts_with(lower(name), lower(q)). The address keeps its own prefix
-- index, the unique one (contacts_account_email).
CREATE FUNCTION contact_name_terms(account uuid, first_name text, last_name text)
    RETURNS tsvector
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN array_to_tsvector(array_remove(
        ARRAY[account::text || ' ' || lower(first_name), account::text || ' ' || lower(last_name)],
        NULL));

-- The prefix query for `q`: quoted so that no character of it is tsquery syntax.
CREATE FUNCTION contact_name_query(account uuid, q text)
    RETURNS tsquery
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN ('''' || replace(replace(account::text || ' ' || lower(q), '\', '\\'), '''', '''''')
            || ''':*')::tsquery;

CREATE INDEX contacts_names ON contacts USING gin (contact_name_terms(account_id, first_name, last_name));
DROP INDEX contacts_account_first_name;
DROP INDEX contacts_account_last_name;

-- Rows of an import whose address comes again later in the file: the later row is applied,
-- these are counted and the first of them named, with the row that replaced each.
ALTER TABLE import_jobs
    ADD COLUMN duplicate_count integer NOT NULL DEFAULT 0,
    ADD COLUMN duplicates      jsonb   NOT NULL DEFAULT '[]'::jsonb;
