"""pointgate: an MQTT ingestion broker for EnOS-protocol field devices."""

__version__ = "0.1.0"
