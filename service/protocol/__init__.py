"""The EnOS device protocol, pure: topics, request envelopes, login signatures. No I/O, no broker.

May import: ``service.errors`` only.
"""
