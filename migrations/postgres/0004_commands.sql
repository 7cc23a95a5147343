-- The command log: every downstream command (fire-and-forget `cmd` and synchronous `rpc`) is a row whose
-- state only moves forward: queued -> sent -> delivered -> replied | expired | failed. Each transition keeps
-- its own timestamp. `next_attempt_at` is both the dispatch schedule and the lease: whoever claims a row
-- moves it into the future, so two instances never send the same command at once; a claim whose owner
-- died comes due again when the lease runs out.
CREATE TABLE device_commands (
    product_id        TEXT NOT NULL,
    device_id         TEXT NOT NULL,
    request_id        TEXT NOT NULL,
    mode              TEXT NOT NULL CHECK (mode IN ('cmd', 'rpc')),
    name              TEXT NOT NULL,
    -- How the caller gave the payload (plain | base64 | json); the topic's encoding level follows from it.
    payload_format    TEXT NOT NULL CHECK (payload_format IN ('plain', 'base64', 'json')),
    payload           BYTEA NOT NULL,
    qos               SMALLINT NOT NULL CHECK (qos IN (0, 1, 2)),
    idempotency_key   TEXT,
    state             TEXT NOT NULL CHECK (state IN ('queued', 'sent', 'delivered', 'replied', 'expired', 'failed')),
    created_at        BIGINT NOT NULL,
    expires_at        BIGINT,
    sent_at           BIGINT,
    delivered_at      BIGINT,
    replied_at        BIGINT,
    expired_at        BIGINT,
    failed_at         BIGINT,
    failure           TEXT,
    attempts          INTEGER NOT NULL DEFAULT 0,
    max_attempts      INTEGER NOT NULL DEFAULT 1 CHECK (max_attempts BETWEEN 1 AND 100),
    retry_interval_ms BIGINT,
    next_attempt_at   BIGINT,
    reply             BYTEA,
    reply_message_id  TEXT,
    PRIMARY KEY (product_id, device_id, request_id),
    FOREIGN KEY (product_id, device_id) REFERENCES devices (product_id, device_id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX device_commands_idempotency
    ON device_commands (product_id, device_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX device_commands_by_time ON device_commands (product_id, device_id, created_at, request_id);
-- The scheduler's two questions: what is due to be sent, what has expired.
CREATE INDEX device_commands_due ON device_commands (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
CREATE INDEX device_commands_open_expiry
    ON device_commands (expires_at) WHERE expires_at IS NOT NULL AND state IN ('queued', 'sent', 'delivered');
-- Offline queue: what to send when a device connects.
CREATE INDEX device_commands_queued ON device_commands (product_id, device_id) WHERE state = 'queued';
