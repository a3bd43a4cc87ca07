"""What pays on the decode path: the default of the `prefetch` option, and the read threads, of
the connector and the HF runtime."""

from __future__ import annotations

import os

import torch


def default_prefetch(reselect: bool, device: str = "cpu") -> bool:
    """Whether the step-start and layer-ahead prefetches run when the user does not say.
    Without reselect the layer attends to the prediction, so it must be made. With reselect it
    is only a prefetch: it pays where the model computes on a GPU and the host's cores are free
    to predict and read, and costs where they are the cores the model runs on. Measured on the
    2-core dev machine, vLLM, ~4k tokens x 4, the same selection attended: 0.79 s per step with
    it vs 0.58 without (0.90 vs 0.59 under the eMMC profile): it scores every layer twice more
    and reads 1.7x the groups (docs/results/throughput_noprefetch_4k.json)."""
    return not reselect or torch.device(device).type != "cpu"


def decode_io_threads(profile_threads: int, cpus: int | None = None) -> int:
    """Read threads of the decode path (vLLM's connector and the HF runtime): the device's queue
    depth, but at most half the cores. Decode reads are small (a layer's missing groups) and each read thread runs Python between
    syscalls, taking the GIL and a core from the forward pass: on 2 cores, 4 requests of 2k
    tokens, one read thread instead of 16 made decode steps 1.9x faster (0.89 -> 0.48 s)."""
    return max(1, min(profile_threads, (cpus or os.cpu_count() or 2) // 2))
