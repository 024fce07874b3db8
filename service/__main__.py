"""``python -m service`` runs the ``pointgate`` command line."""

from service.cli.main import main

main()
