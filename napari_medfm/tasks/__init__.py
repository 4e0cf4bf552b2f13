"""Tasks: the work behind each widget and CLI command, written as generators that yield progress."""
