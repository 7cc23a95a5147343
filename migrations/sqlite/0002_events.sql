-- Broker events in (embedded profile): same tables as migrations/postgres/0002_events.sql.

ALTER TABLE devices ADD COLUMN online INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN last_seen_at INTEGER;
CREATE INDEX devices_product_online ON devices (product_id, device_id) WHERE online;

CREATE TABLE device_connections (
    product_id      TEXT NOT NULL,
    device_id       TEXT NOT NULL,
    client_id       TEXT NOT NULL,
    session_key     TEXT NOT NULL,
    connected_at    INTEGER,
    disconnected_at INTEGER,
    ip_address      TEXT,
    proto_ver       INTEGER,
    keepalive       INTEGER,
    clean_start     INTEGER,
    reason          TEXT,
    node            TEXT,
    PRIMARY KEY (product_id, device_id, client_id, session_key),
    FOREIGN KEY (product_id, device_id) REFERENCES devices (product_id, device_id) ON DELETE CASCADE
);

CREATE TABLE device_messages (
    product_id   TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    message_id   TEXT NOT NULL,
    data_type    TEXT NOT NULL,
    payload      BLOB NOT NULL,
    payload_json TEXT,
    sent_at      INTEGER NOT NULL,
    stored_at    INTEGER NOT NULL,
    PRIMARY KEY (product_id, device_id, message_id)
);
CREATE INDEX device_messages_time ON device_messages (product_id, device_id, sent_at, message_id);

CREATE TABLE device_reports (
    product_id  TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('status', 'ota')),
    payload     TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    reported_at INTEGER NOT NULL,
    PRIMARY KEY (product_id, device_id, kind),
    FOREIGN KEY (product_id, device_id) REFERENCES devices (product_id, device_id) ON DELETE CASCADE
);

CREATE TABLE event_outbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    kind         TEXT NOT NULL,
    routing_key  TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    body         BLOB NOT NULL,
    created_at   INTEGER NOT NULL,
    leased_until INTEGER NOT NULL DEFAULT 0
);
