"""carve.engine: the bottom layer that touches the model.

Base models and how they load (``models``, ``loading``), the branch-mixing
decoding engine (``decoding``), many LoRA adapters in one batch
(``multi_lora``), the adapter checks the engine runs before peft sees a folder
(``adapter_checks``), the one LRU of adapters and weight-space merges an
engine holds (``adapter_cache``), running batches of jobs on it (``batching``),
and the prompt text rules every layer shares (``text``: chat template, BOS,
token counts, context; ``templates``: the Alpaca format adapters are trained on).

It imports nothing above ``carve.artifact`` and ``carve.common``.
"""
