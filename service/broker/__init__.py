"""The MQTT side: amqtt 0.12.1 with our overrides (``overrides``), the topic ACL, the broker's listener
configuration, login plugins, and the ingest handler that turns a request into a commit, a reply and a PUBACK.

The only package that touches amqtt. May import every other package of ``service`` except ``cli`` and ``app``.
"""
