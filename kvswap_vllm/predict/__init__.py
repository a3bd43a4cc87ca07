"""Which groups each layer needs: compact metadata + predictors behind one interface.

Import rule: nothing here imports vllm, kvswap_vllm.vllm, the store or the CLI.
"""
