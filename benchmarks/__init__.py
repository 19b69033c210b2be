"""The stall-time benchmark of asyncckpt against torch.save, DeepSpeed and torch.distributed.checkpoint.

``python -m benchmarks --config benchmarks/configs/gpt_0p1gb.yaml`` runs every system on the same training
state, on the same disk, in one run, together with the physical floors (memcpy, sequential write+fsync, codec
alone), and writes raw JSON, a Markdown table of medians and ratios, a PNG plot and the issue's targets as
PASS/MISS (protocol: ``BENCHMARK.md`` of the project).

Modules, one responsibility each:

* :mod:`benchmarks.spec`     the YAML workload/run configuration
* :mod:`benchmarks.workload` the GPT-style decoder with AdamW whose state is checkpointed
* :mod:`benchmarks.systems`  one adapter per checkpointing system, with a common interface
* :mod:`benchmarks.measure`  the measurement protocol (stall, time to durable, loop overhead, memory, load)
* :mod:`benchmarks.floors`   memcpy, disk and codec floors
* :mod:`benchmarks.worker`   what one measurement process (or one rank) runs
* :mod:`benchmarks.runner`   launches the processes (and ranks), collects the raw results
* :mod:`benchmarks.report`   medians, Markdown tables and the plot
* :mod:`benchmarks.targets`  the issue's targets as ratios measured in the same run
"""
