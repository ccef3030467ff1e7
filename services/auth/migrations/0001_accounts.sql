-- Identities, credentials, sessions, keys and the audit trail of the auth service.

CREATE EXTENSION IF NOT EXISTS citext;

CREATE TABLE users (
    id                  uuid PRIMARY KEY,
    username            citext      NOT NULL UNIQUE,
    email               citext      NOT NULL UNIQUE,
    email_verified      boolean     NOT NULL DEFAULT false,
    pending_email       citext,
    password_hash       text        NOT NULL,
    role                text        NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
    status              text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    display_name        text,
    timezone            text        NOT NULL DEFAULT 'UTC',
    default_sender_name text,
    reply_to            text,
    daily_send_quota    integer CHECK (daily_send_quota IS NULL OR daily_send_quota >= 0),
    -- Access tokens issued before this instant are refused everywhere (disable, reset).
    tokens_valid_after  double precision NOT NULL DEFAULT 0,
    mfa_secret          text,
    mfa_pending_secret  text,
    -- The last TOTP time step accepted: a code is good once (no replay).
    mfa_last_step       bigint      NOT NULL DEFAULT 0,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX users_created ON users (created_at, id);

CREATE TABLE recovery_codes (
    user_id   uuid  NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    code_hash bytea NOT NULL,
    used_at   timestamptz,
    PRIMARY KEY (user_id, code_hash)
);

-- One session per login; its refresh tokens rotate, and reuse of a spent one revokes it.
CREATE TABLE sessions (
    id           uuid PRIMARY KEY,
    user_id      uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    revoked_at   timestamptz,
    user_agent   text,
    ip           text
);

CREATE INDEX sessions_user ON sessions (user_id) WHERE revoked_at IS NULL;

CREATE TABLE refresh_tokens (
    token_hash bytea PRIMARY KEY,
    session_id uuid        NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    issued_at  timestamptz NOT NULL DEFAULT now(),
    used_at    timestamptz
);

CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);

-- Single-use, expiring tokens carried by links and the MFA step of a login.
CREATE TABLE action_tokens (
    token_hash bytea PRIMARY KEY,
    user_id    uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    purpose    text        NOT NULL CHECK (purpose IN ('verify_email', 'reset_password', 'mfa_login')),
    data       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    expires_at timestamptz NOT NULL,
    used_at    timestamptz
);

CREATE INDEX action_tokens_user ON action_tokens (user_id, purpose);

CREATE TABLE api_keys (
    id           uuid PRIMARY KEY,
    user_id      uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name         text        NOT NULL,
    scope        text        NOT NULL CHECK (scope IN ('send', 'full')),
    prefix       text        NOT NULL,
    key_hash     bytea       NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);

CREATE INDEX api_keys_user ON api_keys (user_id) WHERE revoked_at IS NULL;

-- Failed-attempt counters per login key (an address, whether or not it has an account, and a
-- client address), so throttling looks the same for accounts that exist and those that do not.
CREATE TABLE throttles (
    key          text PRIMARY KEY,
    failures     integer     NOT NULL DEFAULT 0,
    window_start timestamptz NOT NULL DEFAULT now(),
    locked_until timestamptz
);

CREATE TABLE audit_log (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    actor_id   uuid,
    action     text        NOT NULL,
    target_id  uuid,
    details    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    ip         text
);

CREATE INDEX audit_log_target ON audit_log (target_id, id);
