"""carve.evaluation: the paper's evaluation (tasks as text generation, token F1 and ROUGE-L, k-shot).

``schema`` (the report and prediction records), ``suite`` (task files),
``prompts`` (k-shot prompts fitted to the context), ``metrics``, ``run``
(decoding every model on every task, resumable), ``compare`` (paired
bootstrap gains), ``report`` (tables, chart, files).
"""
