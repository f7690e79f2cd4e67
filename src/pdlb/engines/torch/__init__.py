"""pdlb's own engine: continuous batching over a torch model (or the cost-model simulator)."""
