"""The hot tier: a bounded set of group slots per layer, filled from the disk tier."""
