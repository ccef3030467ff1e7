-- Ids of the contacts an import creates. `uuidv7()` draws from the strong random source on
-- every call, several microseconds each: a large share of a million-row import. An import
-- instead takes one UUIDv7 and puts each row's number in its last 32 bits (a counter in the
-- random bits, as RFC 9562 section 6.2 allows): the ids stay unique, time-ordered and in the
-- file's order.
CREATE FUNCTION import_contact_id(base uuid, row_no integer) RETURNS uuid
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN encode(overlay(uuid_send(base) PLACING int4send(row_no) FROM 13), 'hex')::uuid;
