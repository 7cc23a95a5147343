-- Token clients' grants, written at CONNECT so the broker's later authz questions (they carry no
-- credential) are answered the same after a restart (docs/architecture.md, "Threat model").
CREATE TABLE mqtt_token_sessions (
    client_id  TEXT NOT NULL,
    username   TEXT NOT NULL,
    acl        TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (client_id, username)
);
CREATE INDEX mqtt_token_sessions_expiry ON mqtt_token_sessions (expires_at);
