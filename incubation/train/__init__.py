"""The one training engine for every stage (see engine.py) and its checkpoints (checkpoint.py)."""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .engine import DivergedError, TrainConfig, TrainResult, evaluate, train
from .lock import RunDirLocked
from .schedule import epochs_to_steps, lr_at

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "lr_at", "epochs_to_steps", "save_checkpoint", "load_checkpoint",
           "CheckpointError", "DivergedError", "RunDirLocked"]
