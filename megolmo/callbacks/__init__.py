"""Everything that observes or interrupts the training loop (``base.Callback``)."""
from megolmo.callbacks.base import Callback, CallbackError, CallbackList, StepRecord
from megolmo.callbacks.checkpointing import Checkpointing
from megolmo.callbacks.console import ConsoleLog
from megolmo.callbacks.metrics_file import MetricsFile
from megolmo.callbacks.pipeline_timeline import PipelineTimeline
from megolmo.callbacks.run_summary import RunSummary
from megolmo.callbacks.stop_requests import PREEMPTED_EXIT_CODE, StopRequest, StopRequests
from megolmo.callbacks.tensorboard_log import TensorBoardLog
from megolmo.callbacks.wandb_log import WandbLog

__all__ = ["Callback", "CallbackError", "CallbackList", "Checkpointing", "ConsoleLog", "MetricsFile",
           "PREEMPTED_EXIT_CODE", "PipelineTimeline", "RunSummary", "StepRecord", "StopRequest", "StopRequests",
           "TensorBoardLog", "WandbLog"]
