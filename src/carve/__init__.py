"""Carve: carve self-specialized domain experts out of one base model and serve them.

Importing ``carve`` stays light: torch, peft and ray are imported by the modules
that need them, when a command needs them.
"""

__version__ = "0.1.0"
