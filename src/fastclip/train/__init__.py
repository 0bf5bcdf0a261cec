"""The CLIP trainer (``fastclip train``): see ``fastclip.train.trainer``."""
from .checkpoint import load_training_state, resolve_resume, save_training_state
from .optim import cosine_lr, create_optimizer, create_scheduler, param_groups
from .trainer import TrainConfig, Trainer, train

__all__ = ["TrainConfig", "Trainer", "train", "create_optimizer", "create_scheduler", "cosine_lr", "param_groups",
           "save_training_state", "load_training_state", "resolve_resume"]
