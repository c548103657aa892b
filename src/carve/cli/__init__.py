"""carve.cli: the ``carve`` command. ``carve.cli.app`` holds the table of commands; each command lives in its own module."""
