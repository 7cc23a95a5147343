-- OTA rollouts: one upgrade (type + version + package) pushed to one device or every device of a tag. Each
-- target device gets an `$ota_upgrade` command (request id = rollout id) in the command log, and its progress
-- (`update_ota_status`) and final outcome are tracked here. A target succeeds only when the device's status
-- report carries the new version (`{type}_version`), not when it merely says 100 %.
CREATE TABLE ota_rollouts (
    id         TEXT PRIMARY KEY,
    product_id TEXT NOT NULL REFERENCES products (id) ON DELETE CASCADE,
    tag        TEXT,
    type       TEXT NOT NULL,
    version    TEXT NOT NULL,
    url        TEXT NOT NULL,
    size       BIGINT NOT NULL,
    md5        TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX ota_rollouts_by_product ON ota_rollouts (product_id, created_at);
CREATE TABLE ota_targets (
    rollout_id   TEXT NOT NULL REFERENCES ota_rollouts (id) ON DELETE CASCADE,
    product_id   TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('pending', 'in_progress', 'installed', 'failed', 'succeeded')),
    progress     INTEGER,
    error        TEXT,
    progress_at  BIGINT,
    succeeded_at BIGINT,
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (rollout_id, device_id),
    FOREIGN KEY (product_id, device_id) REFERENCES devices (product_id, device_id) ON DELETE CASCADE
);
-- A device's upgrades (API, and the cascade when a device is deleted).
CREATE INDEX ota_targets_by_device ON ota_targets (product_id, device_id);
