"""``python -m service`` runs the ``pointgate`` command line."""

from service.cli import main

main()
