-- Durable kick intents (docs/operations.md, "What is guaranteed"): a suspension, deletion or leaked-secret
-- rotation whose kick the broker did not confirm stays here until one succeeds, whichever instance retries it.
CREATE TABLE pending_kicks (
    username        TEXT PRIMARY KEY,
    requested_at    BIGINT NOT NULL,
    next_attempt_at BIGINT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX pending_kicks_due ON pending_kicks (next_attempt_at);
