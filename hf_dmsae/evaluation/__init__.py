"""How good a trained SAE is: held-out FVU, L0s and CE loss recovered, progressive prefix metrics, SAEBench."""
