"""carve.specialize: the self-specialization run (seeds to a LoRA adapter) and its evaluation."""
