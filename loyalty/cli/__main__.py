"""``python -m loyalty.cli``: the ``loyalty`` command."""

from loyalty.cli import main

main()
