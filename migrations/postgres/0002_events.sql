-- Broker events in: presence, device data history, current status, and the transactional outbox that
-- feeds RabbitMQ. Times are Unix milliseconds taken from the broker's own event timestamps.

-- Denormalised presence, recomputed from device_connections in the same transaction as each change.
ALTER TABLE devices ADD COLUMN online BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE devices ADD COLUMN last_seen_at BIGINT;
CREATE INDEX devices_product_online ON devices (product_id, device_id) WHERE online;

-- One row per broker session of a device. `session_key` identifies the session the same way in its
-- connect and disconnect events (EMQX: connected_at; RMQTT: the peer address), so both events merge into
-- one row whatever order they arrive in, and replays change nothing.
CREATE TABLE device_connections (
    product_id      TEXT NOT NULL,
    device_id       TEXT NOT NULL,
    client_id       TEXT NOT NULL,
    session_key     TEXT NOT NULL,
    connected_at    BIGINT,
    disconnected_at BIGINT,
    ip_address      TEXT,
    proto_ver       INT,
    keepalive       INT,
    clean_start     BOOLEAN,
    reason          TEXT,
    node            TEXT,
    PRIMARY KEY (product_id, device_id, client_id, session_key),
    FOREIGN KEY (product_id, device_id) REFERENCES devices (product_id, device_id) ON DELETE CASCADE
);

-- upload_data history. The payload is kept byte-exact; payload_json is filled when it parses as JSON.
-- No foreign key: the hot insert path should not pay for one; deleting a device deletes its rows.
CREATE TABLE device_messages (
    product_id   TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    message_id   TEXT NOT NULL,
    data_type    TEXT NOT NULL,
    payload      BYTEA NOT NULL,
    payload_json JSONB,
    sent_at      BIGINT NOT NULL,
    stored_at    BIGINT NOT NULL,
    PRIMARY KEY (product_id, device_id, message_id)
);
CREATE INDEX device_messages_time ON device_messages (product_id, device_id, sent_at, message_id);

-- Latest report per device and kind ('status' from update_status, 'ota' from update_ota_status),
-- ordered by the broker's receive time; equal times apply in arrival order (>=), so none is dropped.
CREATE TABLE device_reports (
    product_id  TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('status', 'ota')),
    payload     JSONB NOT NULL,
    message_id  TEXT NOT NULL,
    reported_at BIGINT NOT NULL,
    PRIMARY KEY (product_id, device_id, kind),
    FOREIGN KEY (product_id, device_id) REFERENCES devices (product_id, device_id) ON DELETE CASCADE
);

-- Transactional outbox: written in the same transaction as the state change it reports, deleted once
-- RabbitMQ confirmed it. `leased_until` keeps two relays from publishing the same rows at once.
CREATE TABLE event_outbox (
    id           BIGSERIAL PRIMARY KEY,
    kind         TEXT NOT NULL,
    routing_key  TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    body         BYTEA NOT NULL,
    created_at   BIGINT NOT NULL,
    leased_until BIGINT NOT NULL DEFAULT 0
);
