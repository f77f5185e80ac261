"""``python -m chatsession``: the command line."""

from chatsession.cli import main

main()
