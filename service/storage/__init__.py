"""PostgreSQL: where the database comes from (embedded or the operator's), migrations, the point writer.

May import: ``service.pipeline`` (the rows it writes), ``service.errors``, ``service.settings``, ``service.ops``.
"""
