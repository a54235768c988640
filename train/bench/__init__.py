"""Measurements, not training: what each method costs in memory and time, one script per question.

``step`` (``python -m rso.train.bench.step``, the ``rso-benchmark`` command) times and measures one training
step of every method side by side on a LLaMA config, byte by byte, with an optional batch/sequence sweep;
``recipes`` sets each method up as its peer's own recipe for ``step``, the profiler and the memory tests;
``layer`` times a single linear layer (full, frozen, ``SubspaceLinear`` merged and split); ``profiling``
breaks a step's time down by operator and model part with ``torch.profiler``; ``plots`` draws activation
bytes against sequence length and batch from :func:`rso.memory.estimate` without building a model; and
``memory_frontier`` runs one measured step of a large LLaMA (1B, 7B) in a memory-capped process and compares
it with the estimate term by term (on a GPU under a cap on the CUDA allocator); ``gpu_session`` runs the GPU
measurements of issue 14 (the 7B step under a 24 GiB cap, 350M / 1B tokens/s eager and compiled, RSO's merge
step) in one prepared call, each part under its own timeout, with a CPU dry run of the same plumbing;
``moe`` pre-trains a tiny Qwen3-MoE with AdamW, galore-torch and RSO (one P per stacked weight, or one per expert)
and measures one step of each (docs/results/moe); ``requantize`` compares the roundings of a quantized W₀'s merge
(docs/results/quantized_merge).
"""
