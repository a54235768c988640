"""Memory accounting: exact byte counts of a real training step (``measure_step``) and an analytic
estimate for any LLaMA-family config or Mixtral / Qwen-MoE mixture of experts (``estimate``; ``python -m
rso.memory``), and a planner for a memory budget (``fit``; ``python -m rso.memory --fit 24GB``)."""
from .cli import main
from .estimate import (METHODS, MOE_FAMILIES, PRESETS, QUANTIZE, estimate, fits, format_estimate, llama_dims,
                       quantized_bytes)
from .planner import FIT_METHODS, fit, fit_methods, format_fit, parse_size
from .measure import LiveTensorTracker, MemoryReport, format_bytes, measure_step, storage_bytes

__all__ = ["MemoryReport", "measure_step", "storage_bytes", "format_bytes", "LiveTensorTracker", "estimate",
           "fits", "format_estimate", "llama_dims", "PRESETS", "METHODS", "main", "fit", "format_fit", "parse_size",
           "FIT_METHODS", "fit_methods", "MOE_FAMILIES", "QUANTIZE", "quantized_bytes"]
