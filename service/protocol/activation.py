"""The dynamic-activation message: what a device activated with secure mode 3 receives, on which topic (pure).

EnOS pushes the device secret on ``/ext/session/{pk}/{dk}/thing/activate/info`` right after the CONNACK, without
the device subscribing: the official SDKs handle that topic as a command (Python ``DeviceActivateCommand``
reads ``params.productKey``, ``params.deviceKey``, ``params.deviceSecret``; the Node SDK
``params.deviceSecret``) and answer on ``…/activate/info_reply``.
"""

from __future__ import annotations

import orjson

METHOD = "thing.activate.info"


def activate_info_topic(product_key: str, device_key: str) -> str:
    """Where an activated device's secret is sent."""
    return f"/ext/session/{product_key}/{device_key}/thing/activate/info"


def activate_info(product_key: str, device_key: str, device_secret: str, message_id: str = "1") -> bytes:
    """The activation message carrying ``device_secret``, in the request envelope the SDKs decode."""
    params = {"productKey": product_key, "deviceKey": device_key, "deviceSecret": device_secret}
    return orjson.dumps({"id": message_id, "version": "1.0", "method": METHOD, "params": params})
