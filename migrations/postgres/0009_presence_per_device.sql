-- Presence with one device-row write per device and group instead of one per change (0003 wrote the row for
-- every change). The online flag after each change, which its event reports, is computed by a read; the row
-- (online, last_seen_at) is written once at the end of each run of consecutive changes of one device, and the
-- caller orders a group's changes by device so a device's changes form one run. Results are those of 0003
-- (and of the statements SQLite runs, server/src/adapters/mod.rs presence_sql); property tests hold both
-- stores to the same truth. A connect and its disconnect in one group no longer flip the flag twice, which
-- also keeps the write a HOT update (the partial index on `online` is not touched).
CREATE OR REPLACE FUNCTION iothub_apply_presence(
    products TEXT[], device_ids TEXT[], clients TEXT[], session_keys TEXT[], is_connect BOOLEAN[],
    connected_ats BIGINT[], disconnected_ats BIGINT[], reasons TEXT[], ips TEXT[], protos INT[],
    keepalives INT[], cleans BOOLEAN[], nodes TEXT[])
RETURNS TABLE (ord INT, connected_at BIGINT, disconnected_at BIGINT, reason TEXT, ip_address TEXT,
               proto_ver INT, keepalive INT, clean_start BOOLEAN, node TEXT, online BOOLEAN)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    i INT;
    merged device_connections%ROWTYPE;
    change_at BIGINT;
    now_online BOOLEAN;
    total INT := COALESCE(array_length(products, 1), 0);
    -- The current run of one device's changes applied something its device row does not show yet.
    pending BOOLEAN := FALSE;
    run_seen BIGINT;
BEGIN
    FOR i IN 1 .. total LOOP
        IF is_connect[i] THEN
            INSERT INTO device_connections AS c
                (product_id, device_id, client_id, session_key, connected_at, ip_address, proto_ver, keepalive,
                 clean_start, node)
            VALUES (products[i], device_ids[i], clients[i], session_keys[i], connected_ats[i], ips[i], protos[i],
                    keepalives[i], cleans[i], nodes[i])
            ON CONFLICT (product_id, device_id, client_id, session_key) DO UPDATE SET
                connected_at = EXCLUDED.connected_at, ip_address = EXCLUDED.ip_address,
                proto_ver = EXCLUDED.proto_ver, keepalive = EXCLUDED.keepalive, clean_start = EXCLUDED.clean_start,
                node = EXCLUDED.node,
                disconnected_at = CASE WHEN c.disconnected_at >= EXCLUDED.connected_at THEN c.disconnected_at END,
                reason = CASE WHEN c.disconnected_at >= EXCLUDED.connected_at THEN c.reason END
            WHERE c.keepalive IS NULL OR c.connected_at IS NULL OR c.connected_at < EXCLUDED.connected_at
            RETURNING c.* INTO merged;
            change_at := connected_ats[i];
        ELSE
            INSERT INTO device_connections AS c
                (product_id, device_id, client_id, session_key, connected_at, disconnected_at, reason, ip_address,
                 node)
            VALUES (products[i], device_ids[i], clients[i], session_keys[i], connected_ats[i], disconnected_ats[i],
                    reasons[i], ips[i], nodes[i])
            ON CONFLICT (product_id, device_id, client_id, session_key) DO UPDATE SET
                disconnected_at = EXCLUDED.disconnected_at, reason = EXCLUDED.reason,
                connected_at = COALESCE(c.connected_at, EXCLUDED.connected_at),
                ip_address = COALESCE(c.ip_address, EXCLUDED.ip_address),
                node = COALESCE(c.node, EXCLUDED.node)
            WHERE (c.disconnected_at IS NULL OR c.disconnected_at < EXCLUDED.disconnected_at)
              AND (c.connected_at IS NULL OR EXCLUDED.disconnected_at >= c.connected_at)
            RETURNING c.* INTO merged;
            change_at := disconnected_ats[i];
        END IF;
        IF FOUND THEN
            SELECT EXISTS (
                SELECT 1 FROM device_connections s
                WHERE s.product_id = products[i] AND s.device_id = device_ids[i] AND s.disconnected_at IS NULL
                  AND NOT EXISTS (
                      SELECT 1 FROM device_connections n
                      WHERE n.product_id = s.product_id AND n.device_id = s.device_id
                        AND n.client_id = s.client_id
                        AND (COALESCE(n.connected_at, n.disconnected_at), n.session_key)
                          > (COALESCE(s.connected_at, s.disconnected_at), s.session_key)))
            INTO now_online;
            pending := TRUE;
            run_seen := GREATEST(run_seen, change_at);
            ord := i;
            connected_at := merged.connected_at;
            disconnected_at := merged.disconnected_at;
            reason := merged.reason;
            ip_address := merged.ip_address;
            proto_ver := merged.proto_ver;
            keepalive := merged.keepalive;
            clean_start := merged.clean_start;
            node := merged.node;
            online := now_online;
            RETURN NEXT;
        END IF;
        IF pending AND (i = total OR products[i + 1] <> products[i] OR device_ids[i + 1] <> device_ids[i]) THEN
            UPDATE devices d SET
                online = now_online,
                last_seen_at = CASE WHEN COALESCE(d.last_seen_at, 0) > run_seen THEN d.last_seen_at ELSE run_seen END
            WHERE d.product_id = products[i] AND d.device_id = device_ids[i];
            pending := FALSE;
            run_seen := NULL;
        END IF;
    END LOOP;
END
$$;
