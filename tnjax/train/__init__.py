"""Pre-training tensorized GPTs: configuration, the optax loop, checkpoints, sharding."""

from tnjax.train.config import TrainConfig, apply_overrides, resolve
from tnjax.train.loop import FlatParams, Trainer, branch, lr_schedule, make_optimizer, param_shardings, train
from tnjax.train.mup import mup_multipliers, scale_by_multipliers

__all__ = ["TrainConfig", "resolve", "apply_overrides", "train", "branch", "Trainer", "FlatParams", "make_optimizer",
           "lr_schedule", "param_shardings", "mup_multipliers", "scale_by_multipliers"]
