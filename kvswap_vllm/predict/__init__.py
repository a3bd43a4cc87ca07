"""Which groups each layer needs: compact metadata + predictors behind one interface.

Import rule: nothing here imports vllm, kvswap_vllm.vllm, the store or the CLI; this module
imports nothing at all (the CLI reads the registry without loading torch).
"""

#: Predictor name -> "module:Class", imported lazily.
PREDICTORS: dict[str, str] = {
    "kvswap": "kvswap_vllm.predict.lowrank:HeadwiseLowRank",
    "kvswap-paper": "kvswap_vllm.predict.lowrank:JointLowRank",
    "quest": "kvswap_vllm.predict.quest:Quest",
    "window": "kvswap_vllm.predict.window:SinkWindow",
    "dense": "kvswap_vllm.predict.dense:Dense",
    # kvswap's scoring with the exact keys (metadata = the whole K): the ceiling, for benchmarks.
    "oracle": "kvswap_vllm.predict.oracle:ExactKeys",
}
