-- Dynamic activation (secure mode 3, issue 12): product secrets, the per-product policy, device activation state.
--
-- * products.secret_enc: the product secret, sealed like device secrets (service/devices/secretbox.py; the
--   associated data is "product:{pk}", which no device's "{pk}/{dk}" can equal). A device holding it may
--   sign in with secure mode 3 while it is registered but not yet activated, and then receives its device
--   secret. dynamic_activation switches that on per product; it needs a secret.
-- * devices.activated_at: when the device first signed in (either mode) or was activated; null = registered
--   but not activated. Secure mode 3 is allowed only while it is null, and the UPDATE that sets it is the
--   activation itself (… WHERE activated_at IS NULL), so of two connections racing (``--workers N``, or two
--   instances) exactly one activates the device.
-- * Devices registered before this migration count as activated: their secrets were handed out by the
--   operator, so no product secret may claim them.
ALTER TABLE products
    ADD COLUMN secret_enc bytea,
    ADD COLUMN dynamic_activation boolean NOT NULL DEFAULT false,
    ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now(),
    ADD CONSTRAINT products_activation_needs_secret CHECK (NOT dynamic_activation OR secret_enc IS NOT NULL);

ALTER TABLE devices ADD COLUMN activated_at timestamptz;

UPDATE devices SET activated_at = created_at;
