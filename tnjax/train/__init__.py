"""Pre-training tensorized GPTs: configuration, the optax loop, checkpoints, sharding."""

from tnjax.train.config import TrainConfig, apply_overrides, resolve
from tnjax.train.loop import FlatParams, Trainer, make_optimizer, param_shardings, train

__all__ = ["TrainConfig", "resolve", "apply_overrides", "train", "Trainer", "FlatParams", "make_optimizer",
           "param_shardings"]
