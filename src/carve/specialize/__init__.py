"""carve.specialize: the self-specialization run, seeds to a LoRA adapter, one resumable folder per run."""
