"""haf_jax's train step vs the same step in PyTorch + transformers (the paper authors' way), one run.

    pip install -e '.[bench]'     # torch (CPU build is enough) and trl
    python benchmarks/vs_pytorch.py [--iters 5] [--pairs 4] [--length 256] [--prompt 64]

Issue 12's synthetic shape: Gemma architecture, 6 layers, width 512, 8 query / 1 key-value heads
of 64, MLP 2048, vocabulary 32,000; random tokens, 4 pairs x 2 x 256 tokens, prompt 64, random
response lengths (the same batch for both); float32; AdamW, clip 1.0, lr 1e-5. Three steps:

  HaF, live reference     L_R + 0.2 L_P, the frozen initial model run every step (no gradient)
  HaF, precomputed ref    the reference log-probs come with the batch
  Baseline                L_R only, no LM head

PyTorch: transformers' GemmaForCausalLM trunk, a bias-free Linear(D, 1) reward head read at the
last real token, full [N, L, V] logits -> log_softmax -> gather (what TRL-style DPO code does),
torch.optim.AdamW + clip_grad_norm_. haf_jax: the real jitted train step (benchmarks/step.py),
built from the same transformers config (haf_jax.model.families.from_hf). Each step is timed warm,
the two sides in turn, median of --iters, both on all CPU cores. The machine is shared: read the
ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

ALPHA, BETA, LR = 0.2, 0.1, 1e-5


def hf_config(vocab=32_000, layers=6, width=512, heads=8, kv_heads=1, head_dim=64, mlp=2048):
    from transformers import GemmaConfig

    return GemmaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )


def random_batch(vocab: int, pairs: int, length: int, prompt: int, seed: int = 0) -> dict:
    """A padded batch in haf_jax's layout: a shared random prompt per pair, random-length responses."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, vocab, (pairs, 2, length)).astype(np.int32)
    tokens[:, 1, :prompt] = tokens[:, 0, :prompt]
    last = prompt + rng.integers(length // 8, length - prompt, (pairs, 2))  # last real token
    pos = np.arange(length)
    mask = ((pos >= prompt) & (pos <= last[..., None])).astype(np.int32)
    tokens = np.where(pos <= last[..., None], tokens, 0).astype(np.int32)
    return {
        "tokens": tokens,
        "response_mask": mask,
        "last_index": last.astype(np.int32),
        "valid": np.ones((pairs,), bool),
        "ref_logp": rng.normal(-800, 50, (pairs, 2)).astype(np.float32),
    }


class TorchHaF:
    """The authors' way in PyTorch: one trunk, a reward head, full-vocabulary log-softmax.

    model: a transformers *ForCausalLM (its `.model` the trunk, `.lm_head` the LM head), trained in
    float32. lora_rank > 0: peft LoRA adapters (alpha `lora_alpha`) injected in place on the MLP
    projections (haf_jax's model.lora default targets), only they and the reward head trained. The
    live reference is a frozen copy of the model as given (before the adapters)."""

    def __init__(self, model, objective: str, live_reference: bool, lora_rank: int = 0, lora_alpha: float = 16.0):
        import copy

        import torch

        self.torch, self.objective = torch, objective
        self.model = model.float().train()
        self.reference = copy.deepcopy(self.model).eval().requires_grad_(False) if live_reference else None
        if lora_rank:
            from peft import LoraConfig, inject_adapter_in_model

            targets = ["gate_proj", "up_proj", "down_proj"]
            inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=targets), model)
            for name, p in model.named_parameters():
                p.requires_grad_("lora_" in name)
        self.reward_head = torch.nn.Linear(model.config.hidden_size, 1, bias=False)
        torch.nn.init.zeros_(self.reward_head.weight)
        params = [p for p in self.model.parameters() if p.requires_grad] + list(self.reward_head.parameters())
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-5, weight_decay=0.0)

    def _logp(self, model, hidden, ids, mask):
        logits = model.lm_head(hidden[:, :-1]).float()  # [N, L-1, V]
        logp = self.torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        return (logp * mask[:, 1:]).sum(-1)

    def step(self, batch) -> float:
        torch = self.torch
        b, _, length = batch["tokens"].shape
        ids = torch.from_numpy(batch["tokens"].reshape(2 * b, length)).long()
        last = torch.from_numpy(batch["last_index"].reshape(2 * b)).long()
        attn = (torch.arange(length)[None] <= last[:, None]).long()
        mask = torch.from_numpy(batch["response_mask"].reshape(2 * b, length)).float()
        hidden = self.model.model(input_ids=ids, attention_mask=attn).last_hidden_state
        reward = self.reward_head(hidden[torch.arange(2 * b), last])[:, 0].view(b, 2)
        loss = -torch.nn.functional.logsigmoid(reward[:, 0] - reward[:, 1]).mean()
        if self.objective == "haf":
            logp = self._logp(self.model, hidden, ids, mask).view(b, 2)
            if self.reference is not None:
                with torch.no_grad():
                    ref_hidden = self.reference.model(input_ids=ids, attention_mask=attn).last_hidden_state
                    ref = self._logp(self.reference, ref_hidden, ids, mask).view(b, 2)
            else:
                ref = torch.from_numpy(batch["ref_logp"])
            margin = (logp[:, 0] - ref[:, 0]) - (logp[:, 1] - ref[:, 1])
            loss = loss + ALPHA * -torch.nn.functional.logsigmoid(BETA * margin).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        return loss.item()


def time_side_by_side(runs, iters: int) -> list[float]:
    """Median seconds of each warm callable in `runs`, timed in turn (A, B, A, B, ...) so that both
    see the same machine load: a busy neighbour slows both sides of a ratio, not one."""
    times = [[] for _ in runs]
    for _ in range(iters):
        for i, run in enumerate(runs):
            t = time.perf_counter()
            run()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def matmul_flops(cfg, data, objective: str, live: bool) -> tuple[float, float]:
    """(PyTorch's, haf_jax's) matmul FLOPs of one step on `data` (step.model_flops): PyTorch's LM head
    runs at all L - 1 positions of every sequence, haf_jax's at the response positions in whole chunks
    (heads.response_logprobs, StepConfig.logprob_chunk); a live reference adds a forward pass, a
    third of a forward + backward. Their ratio is how much less work haf_jax does: a time ratio above
    it is the rest, faster work."""
    import step as jax_bench

    from haf_jax.core.forward import StepConfig

    n, length = 2 * data["tokens"].shape[0], data["tokens"].shape[-1]
    chunk = StepConfig.logprob_chunk
    chunks = -(-int((data["response_mask"][..., 1:] != 0).sum()) // chunk)
    flops = [
        jax_bench.model_flops(cfg, n, length, objective == "haf", positions)
        for positions in (length - 1, chunks * chunk / n)
    ]
    return tuple(f * 4 / 3 if live else f for f in flops)


def matmul_seconds(m: int, k: int, n: int, repeats: int = 15) -> tuple[float, float]:
    """(PyTorch, XLA) best seconds of one float32 [m, k] x [k, n] matmul, the two timed in turn:
    what each library's kernels reach on this machine, next to the step ratios."""
    import jax

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    import torch

    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ja, jb = jax.device_put(a), jax.device_put(b)
    matmul = jax.jit(lambda x, y: x @ y)
    runs = (lambda: ta @ tb, lambda: matmul(ja, jb).block_until_ready())
    best = [float("inf")] * 2
    for _ in range(repeats):
        for i, run in enumerate(runs):
            t = time.perf_counter()
            run()
            best[i] = min(best[i], time.perf_counter() - t)
    return best[0], best[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=64)
    args = ap.parse_args()

    import jax
    import step as jax_bench  # benchmarks/step.py
    import torch

    from haf_jax.model.families import from_hf

    torch.set_num_threads(os.cpu_count())
    config = hf_config()
    cfg = from_hf(config.to_dict())
    data = random_batch(config.vocab_size, args.pairs, args.length, args.prompt)
    print(
        f"haf_jax on {jax.devices()[0].device_kind} x{jax.device_count()}, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads; Gemma 6 x 512, vocab 32000, {args.pairs} pairs x 2 x {args.length} "
        f"(prompt {args.prompt}, {int(data['response_mask'].sum())} response tokens), float32, median of {args.iters}"
    )
    tokens = 2 * args.pairs * args.length
    t_mm_torch, t_mm_xla = matmul_seconds(tokens, config.hidden_size, config.intermediate_size)
    print(
        f"one MLP matmul [{tokens}, {config.hidden_size}] x [{config.hidden_size}, {config.intermediate_size}]: "
        f"PyTorch {t_mm_torch * 1e3:.1f} ms, XLA {t_mm_xla * 1e3:.1f} ms (PyTorch/XLA {t_mm_torch / t_mm_xla:.2f}x)"
    )
    rows = []
    for label, objective, live in (
        ("HaF, live frozen reference", "haf", True),
        ("HaF, precomputed reference", "haf", False),
        ("Baseline (no LM head)", "baseline", False),
    ):
        from transformers import GemmaForCausalLM

        torch.manual_seed(0)
        runner = TorchHaF(GemmaForCausalLM(config), objective, live)
        runner.step(data)  # warm-up
        run_jax, _ = jax_bench.warm_step(cfg, objective, args.pairs, args.length, live_reference=live, data=data)
        t_torch, t_jax = time_side_by_side([functools.partial(runner.step, data), run_jax], args.iters)
        f_torch, f_jax = matmul_flops(cfg, data, objective, live)
        rows.append((label, t_torch, t_jax, f_torch / f_jax))
        print(
            f"{label:28s} PyTorch {t_torch:7.3f} s   haf_jax {t_jax:7.3f} s   ratio {t_torch / t_jax:5.2f}x   "
            f"(FLOP ratio {f_torch / f_jax:4.2f}x)",
            flush=True,
        )
    print("| step | PyTorch + transformers | haf_jax | ratio | FLOP ratio |\n|---|---|---|---|---|")
    print(
        f"| one MLP matmul | {t_mm_torch * 1e3:.1f} ms | {t_mm_xla * 1e3:.1f} ms | {t_mm_torch / t_mm_xla:.2f}x | 1 |"
    )
    for label, t_torch, t_jax, flop_ratio in rows:
        print(f"| {label} | {t_torch:.2f} s | {t_jax:.2f} s | {t_torch / t_jax:.2f}x | {flop_ratio:.2f}x |")


if __name__ == "__main__":
    main()
