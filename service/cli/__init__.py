"""The ``pointgate`` command line (typer): one module per command group; ``main`` is the entry point.

May import anything: it sits beside the composition root (``service.app``).
"""
