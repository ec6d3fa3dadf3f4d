"""One RLHF run on Tunix: the policy (a Hugging Face causal LM directory) optimised against a haf_jax
`RewardFunction` with GRPO or PPO, KL to the frozen initial policy as reference.

The workdir gets `metrics.jsonl` (one row per step: reward_mean, reward_std over the step's
completions, kl (the actor's KL to the reference), response_length (mean generated tokens), and for
PPO value_loss (the critic's loss on the step's fresh rollouts, before its update)),
TensorBoard events in `tensorboard/`, Tunix's orbax checkpoints in `checkpoints/` and `summary.json`
(the held-out mean reward of the initial and the final policy, measured with the same reward
function on the same held-out prompts). Starting again on a workdir with a checkpoint resumes: Tunix
restores the actor (and critic) and its step, the data iterator skips the batches already used, and
metrics.jsonl keeps the rows up to the restored step.
"""

from __future__ import annotations

import json
import math
import pathlib

import jax
import ml_collections
import numpy as np

from haf_jax.core.logs import log
from haf_jax.data import load_tokenizer
from haf_jax.evaluation.reward_function import RewardFunction
from haf_jax.rlhf import fit as fit_lib, policy as policy_lib
from haf_jax.rlhf.prompts import load_prompts
from haf_jax.training.metrics import MetricsLog

ALGORITHMS = ("grpo", "ppo")
# Tunix 0.1.7's PPO adds each sequence's reward into an integer array (jnp.zeros_like of the
# completion ids), which truncates it toward zero: rewards of -0.9..0.9 all become 0. haf_jax hands
# PPO the reward times PPO_REWARD_SCALE (resolution 1 / scale) and scales everything else that the
# reward's unit reaches the same way, so the run is the unscaled problem: the KL coefficient, the
# critic's output (policy.make_critic(scale=)) and its value clip range. Advantages are whitened, so
# the actor's update is unchanged; Adam makes the critic's scaled loss a no-op too (see _row for the
# metrics, which are reported in the reward's own unit).
PPO_REWARD_SCALE = 1000.0


def check(config: ml_collections.ConfigDict) -> None:
    """ValueError naming the first bad setting."""
    if config.algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {config.algorithm!r}; known: {', '.join(ALGORITHMS)}")
    for key in ("train.steps", "train.batch_size", "rollout.max_new_tokens", "grpo.num_generations"):
        section, name = key.split(".")
        if config[section][name] < 1:
            raise ValueError(f"{key} must be >= 1, got {config[section][name]}")
    if config.algorithm == "grpo" and config.grpo.num_generations < 2:
        raise ValueError("grpo.num_generations must be >= 2: GRPO's advantage compares completions of a prompt")


def tunix_mesh():
    """Tunix's (fsdp, tp) mesh on the first device (the demo's and the tests' layout)."""
    return jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))


def run(config: ml_collections.ConfigDict, workdir: str, *, fit_only: bool = False) -> dict:
    """Runs (or resumes) the RLHF run `config` in `workdir`; returns the summary."""
    check(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    policy_dir, reward_model, prompt_spec = config.policy, config.reward.model, config.data.prompts
    if not (policy_dir and reward_model and prompt_spec):
        from haf_jax.rlhf import demo

        made = demo.prepare(config, workdir / "demo")
        policy_dir, reward_model = policy_dir or made["policy"], reward_model or made["reward_model"]
        prompt_spec = prompt_spec or made["prompts"]
    policy_lib.read_policy(policy_dir)  # refuse what Tunix cannot run before anything is loaded
    reward = RewardFunction(
        reward_model,
        step=config.reward.step,
        kind=config.reward.kind,
        length_penalty=config.reward.length_penalty,
        normalize=config.reward.normalize or None,
        batch_size=config.reward.batch_size,
    )
    n_seq = config.train.batch_size * (config.grpo.num_generations if config.algorithm == "grpo" else 1)
    cache = config.data.max_prompt_length + config.rollout.max_new_tokens + 8
    reward_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(reward.model.params))
    reward_params = sum(x.size for x in jax.tree.leaves(reward.model.params))
    fit = fit_lib.estimate(
        policy_dir, reward_params, reward_bytes, ppo=config.algorithm == "ppo", sequences=n_seq, cache_size=cache
    )
    log(fit_lib.describe(fit))
    if fit_only:
        return {"fit": fit}
    if fit["fits"] is False:
        raise ValueError(
            f"actor + reference + reward model{' + critic' if config.algorithm == 'ppo' else ''} "
            "do not fit one device: " + fit_lib.describe(fit).replace("\n", "; ")
        )

    tokenizer = load_tokenizer(policy_dir)
    prompts = load_prompts(
        prompt_spec, tokenizer, max_prompt_length=config.data.max_prompt_length - 1, template=config.data.template
    )
    n_eval = min(config.data.eval_prompts, len(prompts) // 2)
    train_prompts, eval_prompts = prompts[: len(prompts) - n_eval], prompts[len(prompts) - n_eval :]
    learner, cluster = _learner(config, policy_dir, tokenizer, reward, workdir)
    start = cluster.global_steps
    log(f"rlhf: {config.algorithm}, {len(train_prompts)} train / {n_eval} held-out prompts, step {start}")
    summary_path = workdir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() and start else {}
    if "heldout_reward_initial" not in summary and eval_prompts:
        summary["heldout_reward_initial"] = heldout_reward(cluster, reward, eval_prompts, config)
        summary_path.write_text(json.dumps(summary, indent=1))  # a resumed run keeps the initial policy's
    metrics = MetricsLog(workdir, resume_step=start)
    _write_rows_before_checkpoints(metrics, cluster, config.algorithm == "ppo")
    try:
        learner.train(_dataset(train_prompts, config))
    finally:
        metrics.close()
        cluster.close()  # waits for Tunix's asynchronous checkpoint writes
    summary.update(
        algorithm=config.algorithm,
        steps=int(cluster.global_steps),
        resumed_from=int(start) if start else summary.get("resumed_from", 0),
        policy=str(policy_dir),
        reward_model=str(reward_model),
        prompts=str(prompt_spec),
        heldout_prompts=n_eval,
        fit={k: v for k, v in fit.items() if k != "parts"},
    )
    if eval_prompts:
        summary["heldout_reward_final"] = heldout_reward(cluster, reward, eval_prompts, config)
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary


def heldout_reward(cluster, reward, prompts: list[dict], config) -> float:
    """Mean reward of the policy's completions (rollout sampling settings, `eval_samples` per prompt)
    on the held-out prompts."""
    reps = config.data.eval_samples
    texts = [p["prompt"] for p in prompts for _ in range(reps)]
    raw = [p["raw_prompt"] for p in prompts for _ in range(reps)]
    out = cluster.generate(prompts=texts, micro_batch_size=len(texts))
    return float(np.mean(reward(raw, out.text)))


def _learner(config, policy_dir, tokenizer, reward, workdir):
    """(learner, RL cluster) for the config; Tunix restores from workdir/checkpoints when it holds one."""
    import optax
    import orbax.checkpoint as ocp
    from tunix.rl import rl_cluster as rlc
    from tunix.rl.rollout import base_rollout

    mesh = tunix_mesh()
    actor, spec = policy_lib.load_policy(policy_dir, mesh)
    reference, _ = policy_lib.load_policy(policy_dir, mesh)
    roles = {rlc.Role.ACTOR: mesh, rlc.Role.REFERENCE: mesh, rlc.Role.ROLLOUT: mesh}
    ppo = config.algorithm == "ppo"
    if ppo:
        roles[rlc.Role.CRITIC] = mesh
    t = config.train
    training = rlc.RLTrainingConfig(
        actor_optimizer=optax.adamw(t.learning_rate, weight_decay=0.0),
        critic_optimizer=optax.adamw(t.critic_learning_rate, weight_decay=0.0) if ppo else None,
        eval_every_n_steps=10**9,
        max_steps=t.steps,
        checkpoint_root_directory=str(workdir / "checkpoints"),
        checkpointing_options=ocp.CheckpointManagerOptions(
            save_interval_steps=config.checkpoint.every_steps, max_to_keep=config.checkpoint.keep
        ),
        pbar_description=None,
    )
    rollout = base_rollout.RolloutConfig(
        max_tokens_to_generate=config.rollout.max_new_tokens,
        max_prompt_length=config.data.max_prompt_length,
        kv_cache_size=config.data.max_prompt_length + config.rollout.max_new_tokens + 8,
        temperature=config.rollout.temperature,
        top_p=config.rollout.top_p,
        top_k=config.rollout.top_k or None,
    )
    cluster_config = rlc.ClusterConfig(
        role_to_mesh=roles,
        rollout_engine="vanilla",
        offload_to_cpu=False,
        training_config=training,
        rollout_config=rollout,
    )
    cluster = rlc.RLCluster(
        actor=actor,
        reference=reference,
        critic=policy_lib.make_critic(actor, spec, seed=config.train.seed, scale=PPO_REWARD_SCALE) if ppo else None,
        tokenizer=policy_lib.TunixTokenizer(tokenizer),
        cluster_config=cluster_config,
    )
    reward_fns = [_reward_fn(reward, scale=PPO_REWARD_SCALE if ppo else 1.0)]
    if ppo:
        from tunix.rl.ppo import ppo_learner

        algo = ppo_learner.PPOConfig(
            num_iterations=config.num_iterations,
            beta=config.beta * PPO_REWARD_SCALE,
            epsilon=config.epsilon,
            clip_range_value=ppo_learner.PPOConfig().clip_range_value * PPO_REWARD_SCALE,
        )
        learner = ppo_learner.PPOLearner(rl_cluster=cluster, ppo_config=algo, reward_fns=reward_fns)
    else:
        from tunix.rl.grpo import grpo_learner

        algo = grpo_learner.GRPOConfig(
            num_generations=config.grpo.num_generations,
            num_iterations=config.num_iterations,
            beta=config.beta,
            epsilon=config.epsilon,
        )
        learner = grpo_learner.GRPOLearner(rl_cluster=cluster, reward_fns=reward_fns, algo_config=algo)
    return learner, cluster


def _reward_fn(reward: RewardFunction, scale: float = 1.0):
    """Tunix's reward callable: the records' own prompts (the template is the reward model's to add)
    and the completions' texts; rewards times `scale` (PPO_REWARD_SCALE for PPO)."""

    def haf_reward(prompts, completions, raw_prompts=None, **kwargs):
        given = prompts if raw_prompts is None else raw_prompts
        return [scale * r for r in reward([str(p) for p in given], [str(c) for c in completions])]

    return haf_reward


def _dataset(prompts: list[dict], config):
    """Batches of `train.batch_size` prompts, shuffled per epoch, enough epochs for train.steps."""
    from grain import python as grain

    rows = [{"prompts": p["prompt"], "raw_prompts": p["raw_prompt"]} for p in prompts]
    epochs = math.ceil(config.train.steps * config.train.batch_size / len(rows)) + 1
    return grain.MapDataset.source(rows).shuffle(seed=config.train.seed).repeat(epochs).batch(config.train.batch_size)


def _write_rows_before_checkpoints(metrics: MetricsLog, cluster, ppo: bool) -> None:
    """Writes step K's metrics.jsonl row from inside Tunix's checkpoint call of step K, before the
    save: the actor's call for GRPO; for PPO the critic's, whose update follows the actor's (its
    value loss is part of the row). A checkpoint then never holds a step whose row is not on disk,
    so a run killed at any moment resumes at its checkpoint's step with every row up to it (Tunix's
    own metrics flush comes after its weight sync, when the checkpoint may already be committed).
    Tunix 0.1.7 has no hook between an update and its save, hence the wrapped `save`."""
    manager = (cluster.critic_trainer if ppo else cluster.actor_trainer).checkpoint_manager
    save, written = manager.save, set()

    def save_after_row(*args, **kwargs):
        rollout = cluster._buffered_train_metrics[0] if cluster._buffered_train_metrics else None
        # the rollout buffer of the step being trained (the closing save comes after the last weight
        # sync, when the current buffer holds only timings: no row then)
        step = int(cluster.global_steps) + 1  # several saves a step with num_iterations > 1: the first writes
        current = rollout is not None and rollout.global_steps == cluster.global_steps
        if current and "rewards/sum" in rollout.metrics and step not in written:
            written.add(step)
            metrics.write(step, _row(rollout.metrics, cluster, ppo))
        return save(*args, **kwargs)

    manager.save = save_after_row


def _row(m: dict, cluster, ppo: bool) -> dict:
    """reward_mean, reward_std, kl, response_length (+ value_loss for PPO) of one step from Tunix's
    rollout buffer `m` ({name: ([values], op)}) and the trainers' buffers of that step."""
    scale = PPO_REWARD_SCALE if ppo else 1.0  # back to the reward's unit
    rewards = np.concatenate([np.ravel(np.asarray(v)) for v in m["rewards/sum"][0]]) / scale
    # GRPO logs "completions/mean_length", PPO "generation/completions/mean_length"
    lengths = [np.mean(v) for k, (vs, _) in m.items() if k.endswith("completions/mean_length") for v in vs]
    if ppo:  # PPO puts the KL into the reward: the per-sequence mean KL of the rollout (absent when beta = 0)
        kl = [np.mean(v) for v in m.get("rewards/reward_kl_penalty", ([],))[0]]
    else:  # GRPO: the KL term of the actor's loss
        kl = [np.mean(v) for v in _step_buffer(cluster.actor_trainer).additional_metrics.get("kl", ([],))[0]]
    row = {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        "kl": float(np.mean(kl)) if kl else 0.0,
        "response_length": float(np.mean(lengths)) if lengths else None,
    }
    if ppo:
        # the critic's loss on this step's fresh rollouts, the first mini-batch measured before any
        # update: how well the value model predicts returns it has not been trained on
        row["value_loss"] = float(np.asarray(_step_buffer(cluster.critic_trainer).losses[0])) / scale**2
    return row


def _step_buffer(trainer):
    """A Tunix trainer's metrics buffer of the step it has just trained (Tunix writes each step's
    metrics one step late, so at its checkpoint call the step's buffer is the "previous" one)."""
    return trainer._prev_buffered_train_metrics
