"""The CLIP trainer (``fastclip train``). Modules: ``config`` (arguments), ``data`` (sampler,
batches, dataset wiring), ``dist_env`` (distributed set-up), ``progress`` (what a run prints),
``model`` (the run's model), ``resume`` (``--resume``), ``trainer`` (the generic loop), ``demo``
(the CPU demo's data, zero-shot sets and run policies), ``optim``, ``checkpoint``, ``run_folder``,
``plots``.

The names below are imported on first use (PEP 562): ``fastclip --help`` reads
``fastclip.train.config`` alone, without the trainer's data, model and evaluation layers."""
from importlib import import_module

_WHERE = {"TrainConfig": "config", "Trainer": "trainer", "StepHook": "trainer", "train": "trainer",
          "create_optimizer": "optim", "create_scheduler": "optim", "cosine_lr": "optim",
          "param_groups": "optim", "save_training_state": "checkpoint",
          "load_training_state": "checkpoint", "resolve_resume": "checkpoint"}

__all__ = list(_WHERE)


_SUBMODULES = ("checkpoint", "config", "data", "demo", "dist_env", "model", "optim", "plots", "progress",
               "resume", "run_folder", "trainer")


def __getattr__(name: str):
    # submodules too: ``fastclip.train.checkpoint.convert_legacy_checkpoint`` after a plain
    # ``import fastclip.train``, as when this package imported them all
    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
