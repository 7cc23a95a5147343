-- Built-in retention (`retention.*` settings) deletes by time across every device. Rows arrive roughly in
-- time order, which is what BRIN indexes summarise: a few pages, next to nothing per insert, and a delete
-- of the oldest rows reads only the block ranges that hold them. `autosummarize` has autovacuum summarise
-- each block range once it fills (an unsummarised range always has to be read).
CREATE INDEX IF NOT EXISTS device_messages_sent_brin ON device_messages USING BRIN (sent_at)
    WITH (autosummarize = on);
CREATE INDEX IF NOT EXISTS device_commands_created_brin ON device_commands USING BRIN (created_at)
    WITH (autosummarize = on);
