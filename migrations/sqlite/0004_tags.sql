-- Device tags (see migrations/postgres/0005_tags.sql).
ALTER TABLE devices ADD COLUMN tags_version INTEGER NOT NULL DEFAULT 0;
CREATE TABLE device_tags (
    product_id TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    tag        TEXT NOT NULL,
    PRIMARY KEY (product_id, device_id, tag),
    FOREIGN KEY (product_id, device_id) REFERENCES devices (product_id, device_id) ON DELETE CASCADE
);
CREATE INDEX device_tags_by_tag ON device_tags (product_id, tag, device_id);
ALTER TABLE device_commands ADD COLUMN tag TEXT;
CREATE INDEX device_commands_by_request ON device_commands (product_id, request_id) WHERE tag IS NOT NULL;
