"""haf_jax: reward models trained with the HaF hybrid objective, in JAX/Flax.

Commands: `python -m haf_jax.train | score | evaluate | export | plan | sample | bon | data`
(docs/DESIGN.md, "The house", lists the rooms behind them). The names below are the library
surface for people who build on the pieces.
"""

from haf_jax.core.losses import bradley_terry, objective, pair_metrics, policy_loss
from haf_jax.model.config import ModelConfig
from haf_jax.model.families import preset
from haf_jax.model.heads import forward_pairs, response_logprobs, rewards

__all__ = [
    "ModelConfig",
    "RewardFunction",
    "bradley_terry",
    "forward_pairs",
    "objective",
    "pair_metrics",
    "policy_loss",
    "preset",
    "response_logprobs",
    "rewards",
]


def __getattr__(name):
    # RewardFunction loads models (orbax, the evaluation path): imported on first use, so that
    # `import haf_jax` and every command's flag checks stay light.
    if name == "RewardFunction":
        from haf_jax.evaluation.reward_function import RewardFunction

        return RewardFunction
    raise AttributeError(f"module 'haf_jax' has no attribute {name!r}")
