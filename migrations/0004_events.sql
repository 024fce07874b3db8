-- Device events (issue 12): thing.event.{eventId}.post, stored with their device time, behind the `events` view.
--
-- * device_events: one row per (device, event, ts) -- the idempotency key, as for points: a re-send replaces
--   the stored row (last write wins). The output parameters are stored as sent, in one jsonb (an event's
--   parameters belong together; there is no per-value column layout to gain as there is for points).
--   event_type is the model's INFO/WARN/ERROR at the time of receipt (null for an event outside a model
--   with validate false), so "every ERROR of last week" needs no model at query time.
-- * Not partitioned: events are alarms and state changes, orders of magnitude rarer than measurement points,
--   so one table with its primary key (per-device history) and a BRIN index (time windows) stays small and
--   needs no partition maintenance. Its key already includes ts, so a later migration can make it
--   partitioned by ts (or a TimescaleDB hypertable) without changing the key.
CREATE TABLE device_events (
    product_key text        NOT NULL,
    device_key  text        NOT NULL,
    event_id    text        NOT NULL,
    ts          timestamptz NOT NULL,
    event_type  text,
    received_at timestamptz NOT NULL,
    output      jsonb       NOT NULL,
    CONSTRAINT device_events_pkey PRIMARY KEY (product_key, device_key, event_id, ts),
    CONSTRAINT device_events_type CHECK (event_type IN ('INFO', 'WARN', 'ERROR'))
);

-- time-window scans across every device ("all events since 08:00"); rows arrive roughly in ts order
CREATE INDEX device_events_ts_brin ON device_events USING brin (ts);

-- The analytics contract (design.md): stable whatever the table under it becomes.
CREATE VIEW events AS
SELECT product_key, device_key, event_id, event_type, ts, output, received_at
FROM device_events;

COMMENT ON VIEW events IS
    'One row per (device, event, ts): the event''s type (INFO/WARN/ERROR) and its output parameters as sent (jsonb).';

-- the read-only analytics role of 0003 reads this view too (created there, or by the DBA)
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'pointgate_analytics') THEN
        GRANT SELECT ON events TO pointgate_analytics;
    END IF;
END
$$;
