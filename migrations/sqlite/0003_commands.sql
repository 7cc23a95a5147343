-- The command log (see migrations/postgres/0004_commands.sql for the model).
CREATE TABLE device_commands (
    product_id        TEXT NOT NULL,
    device_id         TEXT NOT NULL,
    request_id        TEXT NOT NULL,
    mode              TEXT NOT NULL CHECK (mode IN ('cmd', 'rpc')),
    name              TEXT NOT NULL,
    payload_format    TEXT NOT NULL CHECK (payload_format IN ('plain', 'base64', 'json')),
    payload           BLOB NOT NULL,
    qos               INTEGER NOT NULL CHECK (qos IN (0, 1, 2)),
    idempotency_key   TEXT,
    state             TEXT NOT NULL CHECK (state IN ('queued', 'sent', 'delivered', 'replied', 'expired', 'failed')),
    created_at        INTEGER NOT NULL,
    expires_at        INTEGER,
    sent_at           INTEGER,
    delivered_at      INTEGER,
    replied_at        INTEGER,
    expired_at        INTEGER,
    failed_at         INTEGER,
    failure           TEXT,
    attempts          INTEGER NOT NULL DEFAULT 0,
    max_attempts      INTEGER NOT NULL DEFAULT 1 CHECK (max_attempts BETWEEN 1 AND 100),
    retry_interval_ms INTEGER,
    next_attempt_at   INTEGER,
    reply             BLOB,
    reply_message_id  TEXT,
    PRIMARY KEY (product_id, device_id, request_id),
    FOREIGN KEY (product_id, device_id) REFERENCES devices (product_id, device_id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX device_commands_idempotency
    ON device_commands (product_id, device_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX device_commands_by_time ON device_commands (product_id, device_id, created_at, request_id);
CREATE INDEX device_commands_due ON device_commands (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
CREATE INDEX device_commands_open_expiry
    ON device_commands (expires_at) WHERE expires_at IS NOT NULL AND state IN ('queued', 'sent', 'delivered');
CREATE INDEX device_commands_queued ON device_commands (product_id, device_id) WHERE state = 'queued';
