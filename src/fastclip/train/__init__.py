"""The CLIP trainer (``fastclip train``). Modules: ``config`` (arguments), ``data`` (sampler,
batches, dataset wiring), ``dist_env`` (distributed set-up), ``progress`` (what a run prints),
``trainer`` (the generic loop), ``demo`` (the CPU demo's data, zero-shot sets and run policies),
``optim``, ``checkpoint``, ``plots``."""
from .checkpoint import load_training_state, resolve_resume, save_training_state
from .config import TrainConfig
from .optim import cosine_lr, create_optimizer, create_scheduler, param_groups
from .trainer import StepHook, Trainer, train

__all__ = ["TrainConfig", "Trainer", "StepHook", "train", "create_optimizer", "create_scheduler", "cosine_lr",
           "param_groups", "save_training_state", "load_training_state", "resolve_resume"]
