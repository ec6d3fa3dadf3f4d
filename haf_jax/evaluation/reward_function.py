"""`RewardFunction`: a reward model as a Python callable over text, `fn(prompts, completions) -> list[float]`,
the form RL libraries (Tunix's `reward_fns`, TRL's reward functions) call.

Every (prompt, completion) goes through the data layer as the chosen response of a pair
(`datasets.load_data`: the run's template, max_length, truncation rule, BOS, EOS, chat template for
message input) and through `evaluator.Evaluator`, the one evaluation path: a completion's raw score
is exactly `haf_jax.score`'s `reward_chosen` for the same text. Two completions of the same prompt
share one pair (chosen and rejected), so a GRPO group costs half the rows; a completion without a
partner is paired with itself. Pairs are ordered by text length before batching, so each batch pads
to the smallest of the data layer's length buckets that holds it (few compiled shapes, little
padding), and the scores are returned in input order.

Options (applied in this order): `kind="dpo"` reads the implicit reward beta * (log pi - log pi_ref)
of the LM head instead of the reward head; `length_penalty` subtracts that much per response token;
`normalize` standardises with the mean and std measured on a reference set (a data spec whose
chosen and rejected responses are scored once, or an explicit (mean, std)).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from haf_jax import data
from haf_jax.evaluation import datasets, references
from haf_jax.evaluation.evaluator import Evaluator
from haf_jax.evaluation.loading import LoadedModel, default_mesh, load_model

KINDS = ("head", "dpo")


@dataclasses.dataclass(frozen=True)
class Scored:
    """What `RewardFunction.score` gives for N (prompt, completion) inputs, in input order."""

    rewards: np.ndarray  # float32 [N], every option applied (what __call__ returns)
    truncated: np.ndarray  # bool [N]: the data layer had to cut that prompt + completion
    report: dict  # the data layer's report of the scored pairs (two completions a pair)


@dataclasses.dataclass(frozen=True)
class Normalization:
    """reward -> (reward - mean) / std; `pairs` is how many reference pairs measured it (0: given)."""

    mean: float
    std: float
    pairs: int = 0


class RewardFunction:
    """A haf_jax reward model (run directory, export or Hugging Face directory) as a reward callable.

    Args:
      model: a path or hub id (loaded with `load_model`, parameters only) or a `LoadedModel`.
      step: which checkpoint of a run directory (best | last | N).
      kind: "head" (the reward head) or "dpo" (the implicit reward of the LM head against `reference`).
      reference: for kind "dpo": "initial" (a run's initial weights; the default for runs), "free"
        (reference-free) or a model path of the same vocabulary.
      beta: the implicit reward's beta (default: the run's loss.beta, else 0.1).
      length_penalty: subtracted per response token (tokens as the reward model counts them).
      normalize: None, a data spec (or `data.Records`) of preference pairs whose responses give the
        mean and std, or an explicit (mean, std).
      batch_size: pairs per batch (two completions a pair), rounded up to the mesh's data shards.
      max_length, max_prompt_length, template: override the run's data settings (as `score`'s flags).
      whole_prompts: the prompt keeps up to max_prompt_length tokens (at most max_length - 2) instead of
        `score`'s half of max_length: only prompt + completion + EOS > max_length cuts (Best-of-N's
        length rule, `generation/best_of_n`).
      mesh: device mesh (default: every device on the fsdp axis, as `score`).
    """

    __name__ = "haf_reward"  # Tunix names its per-function reward metrics after the callable

    def __init__(
        self,
        model: str | LoadedModel,
        *,
        step: str | int = "best",
        kind: str = "head",
        reference: str | None = None,
        beta: float | None = None,
        length_penalty: float = 0.0,
        normalize: str | data.Records | tuple[float, float] | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        template: str | None = None,
        whole_prompts: bool = False,
        mesh=None,
    ):
        if kind not in KINDS:
            raise ValueError(f"unknown reward kind {kind!r}; known: {', '.join(KINDS)}")
        self.mesh = mesh or default_mesh()
        self.model = model if isinstance(model, LoadedModel) else load_model(model, self.mesh, which=step, beta=beta)
        self.kind, self.length_penalty = kind, float(length_penalty)
        self.data_settings = dict(
            max_length=max_length, max_prompt_length=max_prompt_length, template=template, whole_prompts=whole_prompts
        )
        self.batch_size = datasets.round_batch(batch_size, self.mesh)
        self.reference = None
        if kind == "dpo":
            self.reference = references.load_reference(reference or "initial", self.model, self.mesh, which=step)
            if self.reference == "none":
                raise ValueError("kind='dpo' needs a reference: 'initial', 'free' or a model path")
        self._evaluator = Evaluator(self.model.step_cfg, self.mesh, reward=kind == "head", policy=kind == "dpo")
        self.normalization = None
        if isinstance(normalize, tuple):
            mean, std = (float(x) for x in normalize)
            self.normalization = _checked(mean, std, "the given (mean, std)")
        elif normalize is not None:
            ds = self._load(normalize)
            raw = self._raw(ds).ravel()
            self.normalization = _checked(float(raw.mean()), float(raw.std()), f"reference set {normalize}", len(ds))

    def __call__(self, prompts: Sequence, completions: Sequence, **kwargs) -> list[float]:
        """Rewards of `completions` [N] given `prompts` [N] (strings, or chat messages: a prompt as a
        list of {"role", "content"} and a completion as a string or a list holding the assistant
        message). Other keyword arguments (what RL libraries pass along) are ignored."""
        del kwargs
        return [float(x) for x in self.rewards(prompts, completions)]

    def rewards(self, prompts: Sequence, completions: Sequence) -> np.ndarray:
        """float32 [N]: the rewards of __call__ as an array."""
        return self.score(prompts, completions).rewards

    def score(self, prompts: Sequence, completions: Sequence) -> Scored:
        """The rewards of __call__ with which inputs the data layer cut and its report."""
        pairs, where = _pairs(list(prompts), list(completions))
        if not pairs:
            return Scored(np.zeros(0, np.float32), np.zeros(0, bool), {})
        ds = self._load(data.Records("reward function input", pairs), expected=len(pairs))
        out_N = self._raw(ds)[where[:, 0], where[:, 1]]
        if self.normalization is not None:
            out_N = (out_N - self.normalization.mean) / self.normalization.std
        cut_N = (ds.all_lengths != ds.all_raw_lengths)[where[:, 0], where[:, 1]]
        return Scored(out_N.astype(np.float32), cut_N, ds.report)

    def _load(self, source, expected: int | None = None):
        """`source` tokenised as `score` tokenises it (the run's data settings), degenerate pairs kept."""
        ds = datasets.load_data(source, self.model, degenerate="keep", report=False, **self.data_settings)
        if expected is not None and len(ds) != expected:
            reasons = ", ".join(f"{r} (record {g})" for g, r in ds.skipped[:3])
            raise ValueError(f"the data layer kept {len(ds)} of {expected} (prompt, completion) pairs: {reasons}")
        return ds

    def _raw(self, ds) -> np.ndarray:
        """float32 [len(ds), 2]: head reward or implicit reward, minus the length penalty."""
        ref_logp, free = None, False
        if self.kind == "dpo":
            free = self.reference == "free"
            if not free:
                ref_logp = references.reference_pass(self.reference, ds, self.mesh, batch_size=self.batch_size)
        result = self._evaluator(
            self.model.params,
            ds,
            batch_size=self.batch_size,
            ref_logp_Nx2=ref_logp,
            reference_free=free,
            desc="reward function",
        )
        s = result.scores
        if self.kind == "head":
            raw = s["reward"]
        else:
            raw = self.model.step_cfg.loss.beta * (s["logp"] - s["ref_logp"])
        raw = raw - self.length_penalty * s["n_tokens"]
        if not np.isfinite(raw).all():
            raise FloatingPointError(f"{self.model.name} gave non-finite rewards for {int((~np.isfinite(raw)).sum())}")
        return raw


def _checked(mean: float, std: float, what: str, pairs: int = 0) -> Normalization:
    if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
        raise ValueError(f"cannot normalise with mean {mean} and std {std} from {what}: std must be finite and > 0")
    return Normalization(mean, std, pairs)


def _pairs(prompts: list, completions: list) -> tuple[list[dict], np.ndarray]:
    """Explicit pairs holding every (prompt, completion), two completions of one prompt per pair when
    they are neighbours in length order, and where each went: int [N, 2] (pair index, side 0 | 1)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    chat = [_is_messages(p) for p in prompts]
    if any(chat) and not all(chat):
        raise ValueError("prompts mix strings and chat messages; give one form per call")
    rows = [_record(p, c, i, chat[0] if chat else False) for i, (p, c) in enumerate(zip(prompts, completions))]
    # Length order (text length as a proxy for tokens): neighbours land in the same length bucket.
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["key"], len(rows[i]["text"])))
    pairs, where = [], np.zeros((len(rows), 2), np.int64)
    k = 0
    while k < len(order):
        i = order[k]
        j = order[k + 1] if k + 1 < len(order) and rows[order[k + 1]]["key"] == rows[i]["key"] else None
        where[i] = (len(pairs), 0)
        if j is not None:
            where[j] = (len(pairs), 1)
        pairs.append(
            {
                "prompt": rows[i]["prompt"],
                "chosen": rows[i]["response"],
                "rejected": rows[j if j is not None else i]["response"],
            }
        )
        k += 2 if j is not None else 1
    return pairs, where


def _record(prompt, completion, i: int, chat: bool) -> dict:
    """The prompt and response fields of input `i` in the data layer's explicit or messages form, its
    prompt's identity (`key`: same key, same pair possible) and its text (length order)."""
    if not chat:
        for name, value in (("prompts", prompt), ("completions", completion)):
            if not isinstance(value, str):
                raise ValueError(f"{name}[{i}] must be a string or chat messages, got {type(value).__name__}")
        return {"prompt": prompt, "response": completion, "key": prompt, "text": prompt + completion}
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    if not _is_messages(completion) or len(completion) != 1 or completion[0].get("role") != "assistant":
        raise ValueError(f"completions[{i}] must be a string or a list holding one assistant message")
    key = repr([(m.get("role"), m.get("content")) for m in prompt])
    return {"prompt": list(prompt), "response": completion, "key": key, "text": key + completion[0]["content"]}


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
