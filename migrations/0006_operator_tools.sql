-- What operators look at in their first week (issue 13):
--
-- * device_sessions: one row per device, written by `serve` as devices connect and disconnect (and refreshed
--   while they stay connected), so `pointgate device list` can say who is online, since when, from where.
-- * rejected_messages: every refused request, kept (bounded by count and age, off by a setting) so that
--   `pointgate rejected replay` can store what a corrected thing model now accepts.
-- * a trigger that tells every running `serve` (LISTEN pointgate_devices) when a device is disabled, deleted
--   or gets a new secret, so its live connections are closed within seconds, whichever process changed it.
CREATE TABLE device_sessions (
    product_key  text        NOT NULL,
    device_key   text        NOT NULL,
    online       boolean     NOT NULL,
    client_id    text        NOT NULL,
    peer         text,
    instance     text        NOT NULL,
    connected_at timestamptz NOT NULL,
    last_seen    timestamptz NOT NULL,
    CONSTRAINT device_sessions_pkey PRIMARY KEY (product_key, device_key)
);

CREATE TABLE rejected_messages (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at   timestamptz NOT NULL,
    topic         text        NOT NULL,
    product_key   text        NOT NULL,
    device_key    text        NOT NULL,
    client_id     text,
    code          integer     NOT NULL,
    reason        text        NOT NULL,
    payload       bytea,
    payload_bytes integer     NOT NULL,
    truncated     boolean     NOT NULL,
    replayed_at   timestamptz,
    replay_code   integer,
    replay_reason text
);

CREATE INDEX rejected_messages_received_idx ON rejected_messages (received_at);

CREATE FUNCTION pointgate_devices_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    change text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        change := 'deleted';
    ELSIF NOT NEW.enabled AND OLD.enabled THEN
        change := 'disabled';
    ELSIF NEW.secret_enc IS DISTINCT FROM OLD.secret_enc THEN
        change := 'rotated';
    ELSIF NEW.enabled AND NOT OLD.enabled THEN
        change := 'enabled';
    ELSE
        RETURN NULL;
    END IF;
    PERFORM pg_notify(
        'pointgate_devices',
        json_build_object('productKey', OLD.product_key, 'deviceKey', OLD.device_key, 'change', change)::text
    );
    RETURN NULL;
END
$$;

CREATE TRIGGER devices_notify AFTER UPDATE OR DELETE ON devices
    FOR EACH ROW EXECUTE FUNCTION pointgate_devices_notify();
