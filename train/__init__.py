"""Training pipelines on real data: ``python -m rso.train.pretrain`` (LLaMA from scratch) and
``python -m rso.train.finetune`` (pretrained encoders and decoders), with every method of the project.

One job per module: ``data`` (corpora, tokenizers, packing, batches), ``models`` (configs, packaged
models), ``methods`` (AdamW / GaLore / GoLore / RSO / LoRA set-up), ``schedule``, ``checkpoint``,
``metrics``, ``loop`` (command-line options and the steps both loops share: gradient accumulation,
clipping, progress records), ``tasks`` (fine-tuning tasks and metrics), ``compare`` (method comparison tables).
The benchmarks (memory and speed measurements of every method) are the ``bench`` package.
"""
