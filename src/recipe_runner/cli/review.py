"""plan and diff (being written)."""
