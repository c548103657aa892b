"""``python -m carve.cli``: the ``carve`` command."""

from carve.cli.app import main

main()
