-- The device boundary (docs/architecture.md, "Threat model").
--
-- 1. Token clients' grants, written at CONNECT by whichever iothub instance answered it, so every instance
--    can answer the broker's later authz questions (they carry no credential) and a restart loses nothing.
CREATE TABLE mqtt_token_sessions (
    client_id  TEXT NOT NULL,
    username   TEXT NOT NULL,
    acl        TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (client_id, username)
);
CREATE INDEX mqtt_token_sessions_expiry ON mqtt_token_sessions (expires_at);

-- 2. A client id is the username or `{username}/{suffix}` (suffix in the id alphabet): the rule of
--    protocol/src/identity.rs, for EMQX's PostgreSQL authenticator (emqx-config/queries.txt), so no device
--    can take over another device's session on that path either.
CREATE FUNCTION iothub_client_id_allowed(username TEXT, clientid TEXT) RETURNS BOOLEAN
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT clientid = username
        OR (left(clientid, length(username) + 1) = username || '/'
            AND substr(clientid, length(username) + 2) ~ '^[A-Za-z0-9_-]{1,64}$')
$$;

-- 3. EMQX's own authz sources let a granted `+` match a requested `+` or `#` (emqx_topic:match/2), so a
--    wildcard subscribe row would allow wider filters than iothub's exact coverage check (a device could
--    subscribe to `m2m/p/d/+/#`). Subscribe rows are therefore literal (`eq `) filters: the three the broker
--    auto-subscribes, and one per tag the device has (what the SDK subscribes to). Publish rows keep their
--    wildcards: a published topic name has none for them to widen.
CREATE OR REPLACE VIEW mqtt_acl AS
SELECT d.broker_username AS username,
       'allow'::TEXT AS permission,
       t.action,
       CASE WHEN t.action = 'subscribe' THEN 'eq ' ELSE '' END
           || replace(replace(t.topic, '%p', d.product_id), '%d', d.device_id) AS topic,
       NULL::INT AS qos,
       NULL::INT AS retain,
       t.position
FROM devices d
CROSS JOIN acl_rule_templates t
WHERE d.status = 'active'
  AND t.topic NOT LIKE 'tags/%'
UNION ALL
SELECT d.broker_username,
       'allow'::TEXT,
       'subscribe'::TEXT,
       'eq tags/' || d.product_id || '/' || g.tag || '/cmd/+/+/+/#',
       NULL::INT,
       NULL::INT,
       1000
FROM devices d
JOIN device_tags g ON g.product_id = d.product_id AND g.device_id = d.device_id
WHERE d.status = 'active';
