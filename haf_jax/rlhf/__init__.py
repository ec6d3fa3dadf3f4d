"""RLHF on Tunix with a haf_jax reward model: `python -m haf_jax.rlhf --config=configs/rlhf.py`.

policy.py: a Hugging Face causal LM directory (a haf_jax export's `policy/`, Qwen2, Llama) as a
Tunix model, its tokenizer for Tunix's sampler, a critic made from the policy; prompts.py: the
prompts of any data spec through haf_jax's data layer; fit.py: will actor + reference + reward
(+ critic) fit the device; run.py: the learner (GRPO or PPO), its metrics, checkpoints and resume;
demo.py: the offline demo's rule reward model and policy. Tunix is the `rlhf` extra
(pip install -e ".[rlhf]"); nothing here is imported by the other rooms.
"""
