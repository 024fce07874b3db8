"""service.protocol.activation: the message that hands an activated device its secret, as the SDKs read it."""

from __future__ import annotations

import json

from service.protocol.activation import activate_info, activate_info_topic


def test_activation_message_carries_keys_and_secret() -> None:
    """The message is a request envelope whose params hold the product key, device key and device secret."""
    assert activate_info_topic("pk", "dk") == "/ext/session/pk/dk/thing/activate/info"
    assert json.loads(activate_info("pk", "dk", "s3cret", "7")) == {
        "id": "7",
        "version": "1.0",
        "method": "thing.activate.info",
        "params": {"productKey": "pk", "deviceKey": "dk", "deviceSecret": "s3cret"},
    }
