"""RLHF on Tunix with a haf_jax reward model (python -m haf_jax.rlhf --config=configs/rlhf.py --workdir=DIR).

With no model given (the default) it is the offline demo: haf_jax trains a tiny Qwen2 reward model
on a rule (responses holding the marker word more often are preferred; the bundled sample's
prompts), exports it, and GRPO trains the exported policy against it. A real setup:
  --config.policy=exported/policy --config.reward.model=runs/g2-haf --config.data.prompts=prompts.jsonl
"""

import ml_collections


def get_config(arg: str = "grpo"):
    c = ml_collections.ConfigDict()
    c.algorithm = arg  # grpo | ppo (the paper's RLHF; critic initialised from the policy)
    c.policy = ""  # Hugging Face causal LM directory (qwen2 | llama): e.g. a haf_jax export's policy/; "" = the demo's
    c.reward = ml_collections.ConfigDict()
    c.reward.model = ""  # haf_jax run directory, export or HF reward model; "" = the demo's rule model
    c.reward.step = "best"  # a run directory's checkpoint: best | last | N
    c.reward.kind = "head"  # head (the reward head) | dpo (beta * (log pi - log pi_ref) of its LM head)
    c.reward.normalize = ""  # data spec of pairs whose responses give the reward's mean and std; "" = raw
    c.reward.length_penalty = 0.0  # subtracted per response token
    c.reward.batch_size = 32  # (prompt, completion) pairs per reward batch, two completions a pair
    c.data = ml_collections.ConfigDict()
    c.data.prompts = ""  # data spec (any haf_jax form; prompts only); "" = the demo's rule pairs
    c.data.template = "none"  # the reward model's training template (none | phi2 | mistral)
    c.data.max_prompt_length = 48  # prompt tokens the policy sees (Tunix keeps the end)
    c.data.eval_prompts = 16  # the last N prompts are held out: mean reward before and after, summary.json
    c.data.eval_samples = 4  # completions per held-out prompt
    c.rollout = ml_collections.ConfigDict()
    c.rollout.max_new_tokens = 12
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0  # 0 = off
    c.train = ml_collections.ConfigDict()
    c.train.steps = 30  # learner steps (one batch of prompts each)
    c.train.batch_size = 4 if arg == "grpo" else 16  # prompts per step (PPO: one completion each, GRPO: a group)
    c.train.learning_rate = 3e-3
    c.train.critic_learning_rate = 3e-3  # PPO only
    c.train.seed = 0
    c.beta = 0.04  # KL coefficient to the reference (the initial policy)
    c.epsilon = 0.2  # ratio clip
    c.num_iterations = 1  # optimisation epochs per batch of rollouts
    c.grpo = ml_collections.ConfigDict()
    c.grpo.num_generations = 4  # completions per prompt (GRPO's group)
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 10
    c.checkpoint.keep = 2
    c.demo = ml_collections.ConfigDict()  # used only when policy / reward.model / data.prompts are ""
    c.demo.marker = "yes"
    c.demo.rm_steps = 60
    c.demo.rm_batch_size = 16
    c.demo.rm_learning_rate = 3e-3
    c.demo.rm_alpha = 0.5  # HaF policy weight: how much the LM head learns to say the marker
    c.demo.max_length = 48
    c.demo.seed = 0
    return c
