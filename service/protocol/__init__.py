"""The EnOS device protocol, pure: topics, request envelopes, replies (codes, encoding, wording), login signatures.

No I/O, no broker. May import: ``service.errors`` only (``replies`` imports nothing of pointgate, so
``service.errors`` can take its reply codes from it).
"""
