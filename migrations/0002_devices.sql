-- The device registry: only devices listed here may connect (design.md, Security).
--
-- * secret_enc is the device secret sealed by service/secretbox.py (AES-256-GCM, pk/dk as associated
--   data). EnOS signatures need the secret in clear, so it cannot be hashed; the key is outside the
--   database, so a dump alone does not reveal secrets.
-- * A sub-device may name its gateway; the broker uses that to allow a gateway to publish a batch for
--   it. The gateway must itself be registered (the foreign key), and both columns are set or neither.
CREATE TABLE products (
    product_key text        NOT NULL PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE devices (
    product_key         text        NOT NULL REFERENCES products,
    device_key          text        NOT NULL,
    secret_enc          bytea       NOT NULL,
    enabled             boolean     NOT NULL DEFAULT true,
    gateway_product_key text,
    gateway_device_key  text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT devices_pkey PRIMARY KEY (product_key, device_key),
    CONSTRAINT devices_gateway_fkey FOREIGN KEY (gateway_product_key, gateway_device_key)
        REFERENCES devices (product_key, device_key),
    CONSTRAINT devices_gateway_both CHECK ((gateway_product_key IS NULL) = (gateway_device_key IS NULL)),
    CONSTRAINT devices_gateway_not_self
        CHECK (gateway_product_key IS NULL OR (gateway_product_key, gateway_device_key) <> (product_key, device_key))
);

-- "which sub-devices does this gateway have": the foreign key needs it too, to check a gateway's rows.
CREATE INDEX devices_gateway_idx ON devices (gateway_product_key, gateway_device_key)
    WHERE gateway_product_key IS NOT NULL;
