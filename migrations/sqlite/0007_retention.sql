-- Built-in retention (`retention.*` settings) deletes by time across every device.
CREATE INDEX IF NOT EXISTS device_messages_sent ON device_messages (sent_at);
CREATE INDEX IF NOT EXISTS device_commands_created ON device_commands (created_at);
