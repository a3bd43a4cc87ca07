"""Attention over the selected groups plus the tail (engine-free torch reference)."""
