"""Memory accounting: exact byte counts of a real training step (``measure_step``)."""
from .measure import LiveTensorTracker, MemoryReport, format_bytes, measure_step, storage_bytes

__all__ = ["MemoryReport", "measure_step", "storage_bytes", "format_bytes", "LiveTensorTracker"]
