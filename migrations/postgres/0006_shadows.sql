-- Device shadows: one JSON document per device ({state: {desired, reported}, metadata, version, timestamp}).
-- `version` is also a column so an update is a compare-and-set on it (`WHERE version = $expected`): two
-- writers holding the same version cannot both win, so no update is ever lost.
CREATE TABLE device_shadows (
    product_id TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    version    BIGINT NOT NULL,
    document   JSONB NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (product_id, device_id),
    FOREIGN KEY (product_id, device_id) REFERENCES devices (product_id, device_id) ON DELETE CASCADE
);
