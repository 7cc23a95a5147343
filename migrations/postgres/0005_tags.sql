-- Device tags: a device belongs to any number of tags within its product; a tag command reaches every device
-- of the tag. `tags_version` increments with every change (atomically, in the same statement), so a device
-- asking with its own version learns whether it is stale.
ALTER TABLE devices ADD COLUMN tags_version BIGINT NOT NULL DEFAULT 0;
CREATE TABLE device_tags (
    product_id TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    tag        TEXT NOT NULL CHECK (tag ~ '^[A-Za-z0-9_-]{1,64}$'),
    PRIMARY KEY (product_id, device_id, tag),
    FOREIGN KEY (product_id, device_id) REFERENCES devices (product_id, device_id) ON DELETE CASCADE
);
CREATE INDEX device_tags_by_tag ON device_tags (product_id, tag, device_id);
-- A tag command is one request id with one row per device of the tag.
ALTER TABLE device_commands ADD COLUMN tag TEXT;
CREATE INDEX device_commands_by_request ON device_commands (product_id, request_id) WHERE tag IS NOT NULL;
