"""``python -m carve``: the ``carve`` command."""

from carve.cli.app import main

main()
