"""The one training engine for every stage: the loop (engine.py), its configuration (config.py), the
distributed set-up and data order (distributed.py), the optimizer (optim.py) and schedule
(schedule.py), the records (records.py: metrics log, checkpointer) and the checkpoint files
(checkpoint.py)."""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import DivergedError, TrainConfig, TrainResult
from .engine import evaluate, train
from .lock import RunDirLocked
from .schedule import epochs_to_steps, lr_at, steps_per_epoch

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "lr_at", "epochs_to_steps", "steps_per_epoch",
           "save_checkpoint", "load_checkpoint",
           "CheckpointError", "DivergedError", "RunDirLocked"]
