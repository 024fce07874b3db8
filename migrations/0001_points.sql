-- Measurement points: one row per (device, point, device time).
--
-- * The primary key is the idempotency key: a re-sent message lands on the same rows, and the writer
--   upserts so the last write wins. It ends in ts, and every unique key must include ts, so the table
--   can later become PARTITION BY RANGE (ts) (native, TimescaleDB or Citus) without changing keys.
-- * Exactly one value column is set per row, chosen by the JSON type the device sent:
--   numbers -> value_num, strings -> value_text, booleans -> value_bool, arrays/objects -> value_json.
-- * BRIN on ts: near-free at ingest, tiny, and good for time-window scans (reference/storage-and-peers.md
--   §4.11); pages_per_range 32 because back-filled (resume) data widens ranges.
CREATE TABLE point_data (
    product_key text             NOT NULL,
    device_key  text             NOT NULL,
    point       text             NOT NULL,
    ts          timestamptz      NOT NULL,
    value_num   double precision,
    value_text  text,
    value_bool  boolean,
    value_json  jsonb,
    quality     smallint,
    received_at timestamptz      NOT NULL,
    CONSTRAINT point_data_pkey PRIMARY KEY (product_key, device_key, point, ts),
    CONSTRAINT point_data_one_value CHECK (num_nonnulls(value_num, value_text, value_bool, value_json) = 1)
);

CREATE INDEX point_data_ts_brin ON point_data USING brin (ts) WITH (pages_per_range = 32);

-- The analytics contract (design.md): a stable surface, whatever the tables under it become.
CREATE VIEW measurepoints AS
SELECT product_key,
       device_key,
       point,
       ts,
       COALESCE(value_json, to_jsonb(value_num), to_jsonb(value_text), to_jsonb(value_bool)) AS value,
       value_num,
       quality,
       received_at
FROM point_data;

COMMENT ON VIEW measurepoints IS
    'One row per (device, point, ts): value as sent (jsonb, without quality), value_num when numeric, quality or null.';
