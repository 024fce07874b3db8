"""Every error pointgate raises, and the one table of reply codes a device can receive.

Our exception hierarchy::

    PointgateError
    ├── DeviceFault          a device sent something we refuse; it gets a reply code, is counted,
    │                        and is never logged as an error (the device is wrong, not us)
    └── ServiceFault         something on our side; logged, counted, retried where that makes sense
        ├── ConfigError      a setting or a file the operator gave us is wrong (exit non-zero)
        │   └── ModelError   a thing model file is malformed (names the file and the reason)
        ├── MigrationError   a migration cannot be applied or was edited after it was applied
        └── DatabaseError    PostgreSQL could not be reached or started

The reply codes are EnOS's own (reference/enos-protocol.md §6); `ReplyCode` is the single place they
are defined, with the default message each one carries on the wire.
"""

from __future__ import annotations

import enum


class ReplyCode(enum.IntEnum):
    """Codes a device can find in a ``_reply`` message, with EnOS's wording as ``message``."""

    OK = 200
    MESSAGE_TOO_LARGE = 1008
    MODEL_VALIDATE_FAILED = 1204
    BATCH_FORMAT_ERROR = 1206
    NO_SUB_DEVICE_PERMISSION = 1212
    PAYLOAD_FORMAT_ERROR = 1220
    PAYLOAD_EMPTY = 1251
    METHOD_MISMATCH = 1260
    INTERNAL_ERROR = 500

    @property
    def message(self) -> str:
        """The fixed text EnOS sends with this code."""
        return _MESSAGES[self]


_MESSAGES: dict[ReplyCode, str] = {
    ReplyCode.OK: "",
    ReplyCode.MESSAGE_TOO_LARGE: "Msg size is too large, discard the message",
    ReplyCode.MODEL_VALIDATE_FAILED: "Model validate failed",
    ReplyCode.BATCH_FORMAT_ERROR: "Measurepoint post data format error",
    ReplyCode.NO_SUB_DEVICE_PERMISSION: "No sub-device permission",
    ReplyCode.PAYLOAD_FORMAT_ERROR: "Payload format error",
    ReplyCode.PAYLOAD_EMPTY: "Payload is empty",
    ReplyCode.METHOD_MISMATCH: "Methods not consistent",
    ReplyCode.INTERNAL_ERROR: "Internal error",
}


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
        """The reply's ``message``: EnOS's wording, then our reason."""
        return f"{self.code.message}: {self.detail}" if self.detail else self.code.message


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
