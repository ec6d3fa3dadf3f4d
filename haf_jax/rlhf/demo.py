"""The offline demo's models: a tiny Qwen2 HaF reward model trained on a rule a policy can learn
(responses holding the marker word more often are preferred), on the bundled HH-RLHF sample's
prompts, and its exported policy (the LM head HaF trained beside the reward head).

The pairs: each sample prompt with the first words of its chosen response, the marker inserted
`k` times in the chosen and fewer times in the rejected copy, so the reward head learns to count
the marker and the DPO-trained LM head already says it sometimes: GRPO/PPO has completions that
differ in reward from the first step.
"""

from __future__ import annotations

import pathlib
import random

from haf_jax import data
from haf_jax.config.base import family_config
from haf_jax.core.logs import log
from haf_jax.data import jsonl
from haf_jax.evaluation.export import export
from haf_jax.model import qwen2
from haf_jax.training.loop import train


def rule_pairs(marker: str, *, seed: int = 0, words: int = 8) -> list[dict]:
    """Explicit pairs over the bundled sample's prompts: chosen holds the marker k in [1, 3] times,
    rejected k - 1 or fewer times, both in the same response words."""
    paths = data.sample_paths()
    tok = data.load_tokenizer(paths["tokenizer"])
    ds = data.load_pairs(paths["data"], tok, data.PairOptions(eval_fraction=0.0, max_skip_fraction=1.0), split="all")
    rng = random.Random(seed)
    pairs, seen = [], set()
    for pair in ds.pairs:
        if pair["prompt"] in seen:
            continue
        seen.add(pair["prompt"])
        body = pair["chosen"].split()[:words] or ["Sure."]
        k = rng.randint(1, 3)
        chosen, rejected = list(body), list(body)
        for _ in range(k):
            chosen.insert(rng.randint(0, len(chosen)), marker)
        for _ in range(rng.randint(0, k - 1)):
            rejected.insert(rng.randint(0, len(rejected)), marker)
        pairs.append({"prompt": pair["prompt"], "chosen": " " + " ".join(chosen), "rejected": " " + " ".join(rejected)})
    return pairs


def prepare(config, directory: pathlib.Path) -> dict:
    """{"reward_model", "policy", "prompts"}: the demo's run export and pair file in `directory`,
    trained once (kept for later runs and resumes)."""
    d = config.demo
    directory.mkdir(parents=True, exist_ok=True)
    prompts = directory / "rule_pairs.jsonl"
    exported = directory / "export"
    if (exported / "policy" / "config.json").is_file():
        return {
            "reward_model": str(exported / "reward_model"),
            "policy": str(exported / "policy"),
            "prompts": str(prompts),
        }
    jsonl.write(str(prompts), rule_pairs(d.marker, seed=d.seed))
    c = family_config("tiny-qwen2", qwen2.PRESETS, "haf_jax/rlhf/demo.py", tiny="tiny-qwen2")
    c.data.train = str(prompts)
    c.data.max_length, c.data.max_prompt_length = d.max_length, d.max_length // 2
    c.train.steps, c.train.batch_size, c.train.seed = d.rm_steps, d.rm_batch_size, d.seed
    c.train.eval_every = c.checkpoint.every_steps = d.rm_steps
    c.train.log_every = max(1, d.rm_steps // 4)
    c.optim.learning_rate = d.rm_learning_rate
    c.loss.alpha = d.rm_alpha
    log(f"rlhf demo: training the rule reward model ({d.rm_steps} steps, marker {d.marker!r})")
    summary = train(c, str(directory / "reward_run"))
    log(f"rlhf demo: reward model eval accuracy {summary.get('eval', {}).get('reward_accuracy', summary)}")
    export(str(directory / "reward_run"), str(exported), which="last")
    return {"reward_model": str(exported / "reward_model"), "policy": str(exported / "policy"), "prompts": str(prompts)}
