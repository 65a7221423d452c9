"""Everything that observes or interrupts the training loop (``base.Callback``)."""
from megolmo.callbacks.base import Callback, CallbackError, CallbackList, StepRecord
from megolmo.callbacks.checkpointing import Checkpointing
from megolmo.callbacks.console import ConsoleLog
from megolmo.callbacks.metrics_file import MetricsFile
from megolmo.callbacks.pipeline_timeline import PipelineTimeline
from megolmo.callbacks.run_summary import RunSummary

__all__ = ["Callback", "CallbackError", "CallbackList", "Checkpointing", "ConsoleLog", "MetricsFile",
           "PipelineTimeline", "RunSummary", "StepRecord"]
