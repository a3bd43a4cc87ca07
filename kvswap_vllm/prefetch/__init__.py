"""The layer-ahead pipeline: a layer's reads are in flight while the previous layer computes."""
