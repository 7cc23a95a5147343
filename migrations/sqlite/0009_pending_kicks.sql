-- Durable kick intents: retried until the broker confirms the kick, across restarts.
CREATE TABLE pending_kicks (
    username        TEXT PRIMARY KEY,
    requested_at    INTEGER NOT NULL,
    next_attempt_at INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX pending_kicks_due ON pending_kicks (next_attempt_at);
