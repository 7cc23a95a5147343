-- Embedded profile schema (SQLite). Same tables as migrations/postgres; no EMQX views (the bundled
-- broker asks iothub over HTTP). Times are Unix milliseconds.

CREATE TABLE products (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    created_at  INTEGER NOT NULL
);

CREATE TABLE devices (
    product_id      TEXT NOT NULL REFERENCES products (id),
    device_id       TEXT NOT NULL,
    broker_username TEXT NOT NULL UNIQUE,
    status          TEXT NOT NULL CHECK (status IN ('active', 'suspended')),
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    PRIMARY KEY (product_id, device_id)
);
CREATE INDEX devices_product_status ON devices (product_id, status, device_id);

CREATE TABLE device_credentials (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    broker_username TEXT NOT NULL REFERENCES devices (broker_username) ON DELETE CASCADE,
    salt            TEXT NOT NULL,
    password_hash   TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER
);
CREATE INDEX device_credentials_username ON device_credentials (broker_username, id DESC);

CREATE TABLE api_keys (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    key_hash   TEXT NOT NULL,
    scopes     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
