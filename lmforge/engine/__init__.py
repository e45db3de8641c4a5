"""The engine: how a request becomes tokens.

A request (token ids + GenerationConfig) enters `Engine.add_request`, which makes a `Sequence` and
queues it in the `Scheduler`. Each `Engine.step` asks the scheduler for a `SchedulerOutput`: the
running sequences (one token each when decoding, the next chunk while prefilling) and newly admitted
ones, with KV blocks granted by the `BlockManager` (shared prefix blocks reused when prefix caching is
on; the newest sequences preempted and later recomputed when blocks run out). The engine hands the step to its
executor (`executor.py`), whose `Worker`s (`worker.py`, one per rank) own the model and the KV cache; a
Worker's `ModelRunner` turns
that into a `StepContext` (flat input ids, positions, block tables, slot mapping, sequence lengths),
runs the model (a captured CUDA graph for decode batches on GPU) and returns the logits of the rows
that sample. The `Sampler` picks tokens per request; the engine appends them, streams text through
each sequence's `Detokenizer`, applies stop conditions and frees finished sequences. `AsyncEngine`
runs this loop on a thread for asyncio callers (the server); `pipeline` runs it in the caller's thread.
"""
