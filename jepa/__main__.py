"""``python -m jepa`` is the ``jepa`` command."""

from .cli import main

main()
