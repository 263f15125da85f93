"""Model growth: LEMON lossless expansion and Apollo progressive depth training.

Both only build models (and hooks / schedule settings); training goes through incubation.train.
"""
from .apollo import (
                     ApolloViT,
                     apollo_hook,
                     apollo_schedule,
                     default_stages,
                     even_switch_steps,
                     interpolation_sources,
                     lvps_depth,
                     shared_blocks,
                     too_few_steps,
                     train_apollo,
)
from .lemon import expand_block, lemon_config, lemon_expand, lemon_schedule

__all__ = ["ApolloViT", "apollo_hook", "apollo_schedule", "too_few_steps", "train_apollo", "default_stages", "even_switch_steps",
           "interpolation_sources", "lvps_depth", "shared_blocks", "expand_block",
           "lemon_config", "lemon_expand", "lemon_schedule"]
