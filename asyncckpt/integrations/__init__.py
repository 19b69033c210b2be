"""Integrations with the frameworks people train with. Each submodule imports its framework lazily and is
usable only when that framework is installed (``pip install asyncckpt[deepspeed|lightning|transformers]``):

* :mod:`asyncckpt.integrations.deepspeed` — a DeepSpeed checkpoint engine,
* :mod:`asyncckpt.integrations.lightning` — a Lightning ``CheckpointIO`` plugin,
* :mod:`asyncckpt.integrations.transformers` — asynchronous Hugging Face ``Trainer`` checkpoints.
"""
