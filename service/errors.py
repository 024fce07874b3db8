"""Every exception pointgate raises on purpose, in one hierarchy.

::

    PointgateError
    ├── DeviceFault           a device's request is refused: it gets a reply code (service.protocol.replies),
    │                         is counted, and is never logged as an error (the device is wrong, not us)
    ├── LoginRefused          a device's CONNECT cannot be a valid EnOS login: CONNACK 5, counted by reason
    ├── RegistryError         an operator's registry request is refused (the CLI prints it, exits non-zero)
    │   ├── DeviceExists      ``add`` of a device that is already registered
    │   ├── DeviceNotFound    the device (or gateway) named is not registered
    │   ├── TopologyRefused   a sub-device cannot join or leave that gateway (``device topo``, ``thing.topo.*``)
    │   ├── DeviceInUse       ``delete`` of a gateway that registered sub-devices still name
    │   └── InvalidKey        a key that could never appear in a topic or a login (also a ValueError)
    └── ServiceFault          something on our side; logged, counted, retried where that makes sense
        ├── ConfigError       a setting or a file the operator gave us is wrong (exit non-zero)
        │   └── ModelError    a thing model file is malformed (names the file and the reason)
        ├── MigrationError    a migration cannot be applied or was edited after it was applied
        ├── DatabaseError     PostgreSQL could not be reached or started
        └── SecretUnreadable  a sealed device secret does not open (wrong key file, altered bytes)

May import: ``service.protocol.replies`` (the reply codes a `DeviceFault` carries), nothing else of pointgate.
"""

from __future__ import annotations

from typing import Literal

from service.protocol.replies import ReplyCode, message

LoginRefusalReason = Literal["malformed", "unsupported_secure_mode", "unsupported_sign_method"]
"""Why the CONNECT fields are not an EnOS login (a subset of ``service.ops.metrics.AuthFailureReason``)."""


class PointgateError(Exception):
    """Base of everything pointgate raises on purpose."""


class DeviceFault(PointgateError):
    """A request a device sent is refused with ``code``; ``detail`` says why, for the device to read."""

    def __init__(self, code: ReplyCode, detail: str = "", *, request_id: object = None) -> None:
        self.code = code
        self.detail = detail
        # the request's ``id`` as sent, when the payload got far enough to have one: the reply echoes it
        self.request_id = request_id
        super().__init__(self.text)

    @property
    def text(self) -> str:
        """The reply's ``message`` (worded by ``service.protocol.replies.message``)."""
        return message(self.code, self.detail)


class LoginRefused(PointgateError):
    """The CONNECT fields cannot be a valid EnOS login; ``reason`` says which way (a metrics label)."""

    def __init__(self, reason: LoginRefusalReason, detail: str) -> None:
        self.reason: LoginRefusalReason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class RegistryError(PointgateError):
    """An operator asked the device registry for something it refuses."""


class DeviceExists(RegistryError):
    """``add`` was asked for a device that is already registered."""

    def __init__(self, product_key: str, device_key: str) -> None:
        super().__init__(f"device {product_key}/{device_key} is already registered")


class DeviceNotFound(RegistryError):
    """The device named is not registered."""

    def __init__(self, product_key: str, device_key: str, *, role: str = "device") -> None:
        super().__init__(f"{role} {product_key}/{device_key} is not registered")


class TopologyRefused(RegistryError):
    """A topology change is refused (another gateway's device, a gateway as a sub-device, …); nothing changed."""


class DeviceInUse(RegistryError):
    """The device cannot be deleted: sub-devices name it as their gateway."""


class InvalidKey(RegistryError, ValueError):
    """A product or device key that could never appear in a topic or a login."""


class ServiceFault(PointgateError):
    """Something on our side failed; not the device's doing."""


class ConfigError(ServiceFault):
    """A setting or an operator-supplied file is wrong."""


class ModelError(ConfigError):
    """A thing model file is malformed."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class MigrationError(ServiceFault):
    """A migration could not be applied, or an applied one was edited."""


class DatabaseError(ServiceFault):
    """PostgreSQL could not be reached, started or stopped."""


class SecretUnreadable(ServiceFault):
    """A sealed secret does not open: wrong key file, or the stored bytes were altered."""
