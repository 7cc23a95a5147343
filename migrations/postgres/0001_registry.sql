-- Device registry, credentials, API keys, and the views EMQX 5's built-in PostgreSQL authn/authz read.
-- Times are Unix milliseconds (BIGINT), matching the broker's event timestamps.

CREATE TABLE products (
    id          TEXT PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9_-]{1,64}$'),
    name        TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    created_at  BIGINT NOT NULL
);

CREATE TABLE devices (
    product_id      TEXT NOT NULL REFERENCES products (id),
    device_id       TEXT NOT NULL CHECK (device_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    -- `{product_id}/{device_id}`: what the broker sends as username; unique index serves EMQX's lookups.
    broker_username TEXT NOT NULL UNIQUE,
    status          TEXT NOT NULL CHECK (status IN ('active', 'suspended')),
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    PRIMARY KEY (product_id, device_id),
    CHECK (broker_username = product_id || '/' || device_id)
);
CREATE INDEX devices_product_status ON devices (product_id, status, device_id);

-- One row per issued secret. Several rows are valid at once during a rotation overlap.
CREATE TABLE device_credentials (
    id              BIGSERIAL PRIMARY KEY,
    broker_username TEXT NOT NULL REFERENCES devices (broker_username) ON DELETE CASCADE,
    salt            TEXT NOT NULL,
    password_hash   TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    expires_at      BIGINT
);
CREATE INDEX device_credentials_username ON device_credentials (broker_username, id DESC);

CREATE TABLE api_keys (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    key_hash   TEXT NOT NULL,
    scopes     TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);

-- The device ACL as templates (%p = product id, %d = device id); identical to topics::DEVICE_ACL,
-- which a test checks. Expanded per device at query time, so 1M devices cost 11 rows, not 11M.
CREATE TABLE acl_rule_templates (
    position INT PRIMARY KEY,
    action   TEXT NOT NULL CHECK (action IN ('publish', 'subscribe')),
    topic    TEXT NOT NULL
);
INSERT INTO acl_rule_templates (position, action, topic) VALUES
    (1, 'publish', 'upload_data/%p/%d/+/+'),
    (2, 'publish', 'update_status/%p/%d/+'),
    (3, 'publish', 'update_ota_status/%p/%d/+'),
    (4, 'publish', 'cmd_resp/%p/%d/+/+/+'),
    (5, 'publish', 'rpc_resp/%p/%d/+/+/+'),
    (6, 'publish', 'get/%p/%d/+/+'),
    (7, 'publish', 'm2m/%p/+/%d/+'),
    (8, 'subscribe', 'cmd/%p/%d/+/+/+/#'),
    (9, 'subscribe', 'rpc/%p/%d/+/+/+/#'),
    (10, 'subscribe', 'm2m/%p/%d/+/+'),
    (11, 'subscribe', 'tags/%p/+/cmd/+/+/+/#');

-- EMQX 5 authn: SELECT password_hash, salt, is_superuser FROM mqtt_user WHERE username = ${username} LIMIT 1
-- One row per username: the newest unexpired credential of an active device. EMQX reads a single row,
-- so during a rotation overlap only the new secret works on this path; the HTTP authenticator accepts both.
CREATE VIEW mqtt_user AS
SELECT DISTINCT ON (c.broker_username)
       c.broker_username AS username,
       c.password_hash,
       c.salt,
       FALSE AS is_superuser
FROM device_credentials c
JOIN devices d ON d.broker_username = c.broker_username
WHERE d.status = 'active'
  AND (c.expires_at IS NULL OR c.expires_at > (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT)
ORDER BY c.broker_username, c.id DESC;

-- EMQX 5 authz: SELECT permission, action, topic, qos, retain FROM mqtt_acl WHERE username = ${username}
-- Allow rows only; with authorization.no_match = deny everything else is refused. qos/retain NULL = any.
CREATE VIEW mqtt_acl AS
SELECT d.broker_username AS username,
       'allow'::TEXT AS permission,
       t.action,
       replace(replace(t.topic, '%p', d.product_id), '%d', d.device_id) AS topic,
       NULL::INT AS qos,
       NULL::INT AS retain,
       t.position
FROM devices d
CROSS JOIN acl_rule_templates t
WHERE d.status = 'active';
