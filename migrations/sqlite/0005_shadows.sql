-- Device shadows (see migrations/postgres/0006_shadows.sql).
CREATE TABLE device_shadows (
    product_id TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    version    INTEGER NOT NULL,
    document   TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (product_id, device_id),
    FOREIGN KEY (product_id, device_id) REFERENCES devices (product_id, device_id) ON DELETE CASCADE
);
