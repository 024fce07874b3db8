"""The device registry: devices and their encrypted secrets in PostgreSQL, and the login check against them.

May import: ``service.protocol``, ``service.errors``, ``service.settings``, ``service.ops``.
"""
