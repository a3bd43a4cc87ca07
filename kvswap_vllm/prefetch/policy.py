"""When prefetching pays: the default of the `prefetch` option of the connector and the HF runtime."""

from __future__ import annotations

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
