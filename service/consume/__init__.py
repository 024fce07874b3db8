"""Consumer mode (``pointgate consume``): pointgate behind a clustered MQTT broker, acknowledging after commit.

Its job: join shared subscriptions on the cluster broker, run each request through the same pipeline,
thing models and writer as ``serve``, publish the reply and release the PUBACK only after the commit, bound
what it holds, reconnect by itself and drain on SIGTERM. docs/scale-out.md is the operator's side.

What it may import: the pure layers (service.pipeline, service.protocol, service.model, service.errors),
the writer and database helpers (service.storage), service.devices, service.ops and service.settings.
Never service.broker (amqtt, the embedded broker) nor service.app (the ``serve`` composition root): a
consumer runs no broker of its own.

Modules: ``link`` (the paho-mqtt client on asyncio, manual PUBACK), ``consumer`` (one message, start to
PUBACK), ``service`` (start-up, readiness, drain).
"""
