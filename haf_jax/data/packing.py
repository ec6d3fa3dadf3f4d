"""Packed batches: several pairs per row, one static shape, almost no padding (config data.packing).

Packed batch (dict of NumPy arrays, process-local; R rows of T tokens, K pair slots per row,
B = R * K pair slots, slot b lives in row b // K)::

    tokens         int32 [R, T]  the pairs' sequences back to back, then pad id
    positions      int32 [R, T]  0, 1, ... restarting at each sequence (0 on padding)
    segment_ids    int32 [R, T]  1 + 2 k + side for slot k of the row (side 0 chosen, 1 rejected);
                                 0 on padding. Attention never crosses a segment.
    response_mask  int32 [R, T]  1 on the response tokens incl. the final EOS
    last_index     int32 [B, 2]  index IN THE ROW of each sequence's last token (the EOS)
    valid          bool  [B]     False for empty slots
    index          int64 [B]     pair index in the dataset (-1 for empty slots)

Both sides of a pair share a row (chosen, then rejected), so every per-pair quantity is read from
its own row: the model gathers [R, 2K] values per row and reshapes them to [B, 2], and the
steps and losses see the same [B, 2] arrays as with unpacked [B, 2, L] batches.

Shared prompts (data.share_prompt): a pair's prompt is written once, not once per side: slot k
takes [prompt but its last token | last + chosen | last + rejected], the shared part being segment
-(k + 1) at positions 0 .. P - 2 and each sequence restarting at position P - 1 with the prompt's
last token, so that token's logits predict the first response token inside each sequence's own
segment. Attention lets a sequence see its pair's shared segment (model/attention.py), so the
hidden states, rewards and log-probs are those of the two plain sequences, and the pair costs
P + 1 + |chosen| + |rejected| tokens instead of 2P + |chosen| + |rejected| (`pair_tokens`).
`SharedPromptLoader` puts one such pair per row at bucketed lengths (no packing);
`PackedLoader(share_prompt=True)` packs them.

Plan of an epoch (`PackedLoader`): process p permutes its own pairs with ``(seed, epoch, p)``
(the permutation `PairLoader` uses without length grouping) and fills batches in that order by
best fit (the row with the least room left that still takes the whole pair, at most K pairs per
row). A pair that fits no row waits for the next batch; a batch closes after `LOOKAHEAD` such
misses or when its slots are full. The pairs left when the permutation runs out (the last, partial
batch) are dropped for that epoch, and every process keeps as many batches as the process with
the fewest, so global batch k is the concatenation of the processes' k-th batches. The plan is a
pure function of (seed, epoch, lengths): same seed, same batches; the loader state is PairLoader's.
The number of real pairs per step varies a little (the token budget R x T is what is fixed).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from haf_jax.data import batching
from haf_jax.data.errors import DataError

LOOKAHEAD = 8  # pairs that fit no row before a batch is closed


@dataclasses.dataclass(frozen=True)
class PackShape:
    """Static shape of a process-local packed batch: `rows` x `length` tokens, `per_row` pair slots a row."""

    rows: int
    length: int
    per_row: int

    @property
    def slots(self) -> int:
        return self.rows * self.per_row


def pair_tokens(ds, share_prompt: bool = False) -> np.ndarray:
    """int64 [N]: the tokens each pair takes in a row, both sequences whole or with the prompt shared
    (module docstring: once, plus its last token again per sequence)."""
    both = ds.all_lengths.sum(axis=1).astype(np.int64)
    if not share_prompt:
        return both
    prompt = ds.prompt_lengths.astype(np.int64)
    return both - prompt + (prompt > 0)


def pack_shape(
    ds, batch_size: int, *, length: int = 0, rows: int = 0, row_multiple: int = 1, share_prompt: bool = False
) -> PackShape:
    """The global packed shape for about `batch_size` pairs a step; `rows` / `length` 0 = automatic.

    length (T): 0 -> 4 * max_length; at least 2 * max_length so every pair fits a row.
    rows (R): 0 -> batch_size pairs of the dataset's mean length, rounded DOWN to a multiple of
    `row_multiple` (at least one): the token budget then binds before the slots, so rows end up
    nearly full and a step holds slightly fewer than batch_size pairs on average.
    K: room for four times the average pairs a row, never more than the shortest pair allows.
    Depends only on the global pair lengths, so every process computes the same shape.
    """
    pair_len = pair_tokens(ds, share_prompt)
    length = int(length) or 4 * ds.max_length
    if length < 2 * ds.max_length:
        raise DataError(
            f"data.pack_length={length} is shorter than a pair can be (2 x data.max_length "
            f"= {2 * ds.max_length}); use at least that"
        )
    multiple = math.lcm(int(row_multiple), ds.process_count)
    if rows:
        if rows % multiple:
            raise DataError(
                f"data.pack_rows={rows} must be a multiple of {multiple} (data-parallel size x "
                f"grad_accum, and the process count)"
            )
    else:
        ideal = batch_size * float(pair_len.mean()) / length
        rows = max(multiple, int(ideal // multiple) * multiple)
    per_row = min(4 * math.ceil(batch_size / rows), max(1, length // max(1, int(pair_len.min()))))
    return PackShape(int(rows), length, max(1, per_row))


def pack_order(order: np.ndarray, pair_len_N: np.ndarray, shape: PackShape) -> tuple[list, list]:
    """Best-fit packing of pairs `order` (global indices) into batches of `shape` (process-local).

    Returns (slots, offsets): one int64 [slots] array per complete batch each, the pair of every
    slot (-1 empty) and its first token's index in row ``slot // per_row``.
    """
    out_slots, out_offsets = [], []
    carry: list[int] = []  # pairs that missed the previous batch: tried first
    pos, n = 0, len(order)
    while True:
        free = np.full(shape.rows, shape.length, np.int64)
        used = np.zeros(shape.rows, np.int64)
        slots = np.full(shape.slots, -1, np.int64)
        offsets = np.zeros(shape.slots, np.int64)
        misses, placed, closed = [], 0, False
        candidates = carry
        carry_i = 0
        while True:
            if carry_i < len(candidates):
                pair = candidates[carry_i]
                carry_i += 1
            elif pos < n:
                pair = int(order[pos])
                pos += 1
            else:
                break  # out of pairs: this batch is incomplete
            need = int(pair_len_N[pair])
            ok = (free >= need) & (used < shape.per_row)
            if not ok.any():
                misses.append(pair)
                if len(misses) >= LOOKAHEAD:
                    closed = True
                    break
                continue
            row = int(np.flatnonzero(ok)[np.argmin(free[ok])])  # best fit
            slot = row * shape.per_row + int(used[row])
            slots[slot], offsets[slot] = pair, shape.length - free[row]
            free[row] -= need
            used[row] += 1
            placed += 1
            if placed == shape.slots:
                closed = True
                break
        if not closed:
            return out_slots, out_offsets
        out_slots.append(slots)
        out_offsets.append(offsets)
        carry = misses + candidates[carry_i:]


def make_packed_batch(ds, slots: np.ndarray, offsets: np.ndarray, shape: PackShape, share_prompt: bool = False) -> dict:
    """The process-local packed batch of pair `slots` at `offsets` (module docstring)."""
    r, t, k = shape.rows, shape.length, shape.per_row
    tokens = np.full((r, t), ds.pad_id, np.int32)
    positions = np.zeros((r, t), np.int32)
    segments = np.zeros((r, t), np.int32)
    mask = np.zeros((r, t), np.int32)
    last = np.zeros((shape.slots, 2), np.int32)
    tp = ds.tokens
    for b in np.flatnonzero(slots >= 0):
        row, at = b // k, int(offsets[b])
        j = ds.local_position(int(slots[b]))
        prompt, start = tp.prompt[j], 0
        if share_prompt and len(prompt):  # all but the last prompt token once, as segment -(k + 1)
            start = len(prompt) - 1
            tokens[row, at : at + start] = prompt[:-1]
            positions[row, at : at + start] = np.arange(start)
            segments[row, at : at + start] = -(1 + b % k)
            prompt, at = prompt[-1:], at + start
        n_p = len(prompt)
        for side, resp in enumerate((tp.chosen[j], tp.rejected[j])):
            end = at + n_p + len(resp)
            tokens[row, at : at + n_p] = prompt
            tokens[row, at + n_p : end] = resp
            positions[row, at:end] = start + np.arange(end - at)
            segments[row, at:end] = 1 + 2 * (b % k) + side
            mask[row, at + n_p : end] = 1
            last[b, side] = end - 1
            at = end
    valid = slots >= 0
    return {
        "tokens": tokens,
        "positions": positions,
        "segment_ids": segments,
        "response_mask": mask,
        "last_index": last,
        "valid": valid,
        "index": np.where(valid, slots, -1).astype(np.int64),
    }


class PackedLoader(batching.PairLoader):
    """`PairLoader` with packed batches of one static shape (module docstring); same state and
    resume contract (``state`` / ``restore``), prefetching and `close`; `steps_per_epoch` is that
    of the current epoch (packing makes it vary a little between epochs)."""

    def __init__(
        self,
        ds,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        length: int = 0,
        rows: int = 0,
        row_multiple: int = 1,
        prefetch: int = 4,
        share_prompt: bool = False,
    ):
        super().__init__(ds, batch_size, seed=seed, shuffle=shuffle, length_grouping=False, prefetch=prefetch)
        self.share_prompt = share_prompt
        self.shape = pack_shape(
            ds, batch_size, length=length, rows=rows, row_multiple=row_multiple, share_prompt=share_prompt
        )
        self.local_shape = dataclasses.replace(self.shape, rows=self.shape.rows // ds.process_count)
        self._pair_tokens = pair_tokens(ds, share_prompt)
        self._steps: dict[int, int] = {}  # epoch -> batches (kept: the plan cache holds one epoch)
        self.steps_per_epoch = self.epoch_steps(0)

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(slots int64 [S, P, slots_local], offsets int64 [S, P, slots_local]) of one epoch."""
        if self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        per_proc = []
        for q in range(self.ds.process_count):
            owned = np.arange(q, len(self.ds), self.ds.process_count, dtype=np.int64)
            if self.shuffle:
                owned = owned[np.random.default_rng([self.seed, epoch, q]).permutation(len(owned))]
            per_proc.append(pack_order(owned, self._pair_tokens, self.local_shape))
        steps = min(len(s) for s, _ in per_proc)
        if steps == 0:
            raise DataError(
                f"dataset has too few pairs ({len(self.ds)}) for one packed batch of "
                f"{self.shape.rows} rows x {self.shape.length} tokens"
            )
        slots = np.stack([np.stack(s[:steps]) for s, _ in per_proc], 1)
        offsets = np.stack([np.stack(o[:steps]) for _, o in per_proc], 1)
        self._plan_cache = (epoch, (slots, offsets))
        return slots, offsets

    def epoch_steps(self, epoch: int) -> int:
        if epoch not in self._steps:
            self._steps[epoch] = len(self.plan(epoch)[0])
        return self._steps[epoch]

    def batch_at(self, epoch: int, position: int) -> dict:
        slots, offsets = self.plan(epoch)
        p = self.ds.process_index
        return make_packed_batch(self.ds, slots[position, p], offsets[position, p], self.local_shape, self.share_prompt)

    def padding(self, epoch: int = 0) -> dict:
        """One epoch of this loader: padding fraction of the row tokens, pairs a step, steps, shape,
        and the padding fraction and tokens of plain batches of `batch_size` pairs (`_vs_plain`)."""
        slots, _ = self.plan(epoch)
        real = float(self._pair_tokens[slots[slots >= 0]].sum())
        total = float(slots.shape[0] * self.shape.rows * self.shape.length)
        plain = _plain_padding(self, epoch)
        return {
            "padding_fraction": round(1 - real / total, 4),
            "pairs_per_step": round(float((slots >= 0).sum()) / slots.shape[0], 2),
            "steps": int(slots.shape[0]),
            "shape": f"{self.shape.rows}x{self.shape.length}",
            "unpacked_padding_fraction": plain["padding_fraction"],
            "tokens_vs_plain": round(total / plain["tokens"], 4),
        }


def _plain_padding(loader, epoch: int) -> dict:
    """The padding report of plain [B, 2, L] batches of `loader`'s pairs, batch size, seed and order."""
    return batching.PairLoader(
        loader.ds, loader.batch_size, seed=loader.seed, shuffle=loader.shuffle, prefetch=0
    ).padding(epoch)


class SharedPromptLoader(batching.PairLoader):
    """`PairLoader` (same plan, state and resume contract) whose batches put each pair in a row of
    its own with the prompt shared (module docstring): B rows of T tokens, one pair slot a row,
    T the smallest of `length_buckets(2 x max_length)` that fits the batch's longest pair."""

    def __init__(self, ds, batch_size: int, **kw):
        super().__init__(ds, batch_size, **kw)
        self._pair_len = pair_tokens(ds, share_prompt=True)  # what length grouping and buckets read
        self.buckets = batching.length_buckets(2 * ds.max_length)
        self.shape = PackShape(batch_size, max(self.buckets), 1)  # the largest batch (the fit check)

    def batch_at(self, epoch: int, position: int) -> dict:
        idx, lengths = self.plan(epoch)
        slots = idx[position, self.ds.process_index]
        shape = PackShape(len(slots), int(lengths[position]), 1)
        return make_packed_batch(self.ds, slots, np.zeros(len(slots), np.int64), shape, share_prompt=True)

    def padding(self, epoch: int = 0) -> dict:
        idx, lengths = self.plan(epoch)
        real = float(self._pair_len[idx.reshape(len(idx), -1)].sum())
        total = float(self.batch_size * lengths.astype(np.int64).sum())
        shapes = ", ".join(f"{self.batch_size}x{n}" for n in sorted(set(lengths.tolist())))
        return {
            "padding_fraction": round(1 - real / total, 4),
            "pairs_per_step": float(self.batch_size),
            "steps": int(len(idx)),
            "shape": shapes,
            "tokens_vs_plain": round(total / _plain_padding(self, epoch)["tokens"], 4),
        }


def largest_shape(
    batch_size: int,
    max_length: int,
    *,
    packing: bool,
    share_prompt: bool,
    pack_length: int,
    pack_rows: int,
    row_multiple: int,
) -> PackShape | None:
    """The largest global batch `train_loader` can make with these settings, without reading the
    data (the planner compiles for it): packed rows (every pair at most 2 x max_length tokens
    bounds the automatic row count), one shared-prompt pair a row of 2 x max_length, or None for
    plain [B, 2, L] batches. pack_length / pack_rows 0 = automatic (`pack_shape`); row_multiple:
    data-parallel shards x gradient-accumulation micro-batches."""
    if packing:
        length = int(pack_length) or 4 * max_length
        multiple = int(row_multiple)
        rows = int(pack_rows) or max(multiple, (batch_size * 2 * max_length // length) // multiple * multiple)
        return PackShape(rows, length, 4 * math.ceil(batch_size / rows))
    if share_prompt:
        return PackShape(batch_size, max(batching.length_buckets(2 * max_length)), 1)
    return None


def train_loader(
    ds,
    batch_size: int,
    *,
    seed: int,
    packing: bool,
    share_prompt: bool,
    pack_length: int,
    pack_rows: int,
    row_multiple: int,
):
    """The shuffled training iterator of `batch_size` pairs a step: `PackedLoader` with packing,
    else `SharedPromptLoader` with share_prompt, else `PairLoader`. Packed rows (pack_length /
    pack_rows, 0 = automatic) split evenly over `row_multiple` = data-parallel shards x
    gradient-accumulation micro-batches."""
    if not packing:
        loader = SharedPromptLoader if share_prompt else batching.PairLoader
        return loader(ds, batch_size, seed=seed, shuffle=True)
    return PackedLoader(
        ds,
        batch_size,
        seed=seed,
        shuffle=True,
        length=int(pack_length),
        rows=int(pack_rows),
        row_multiple=int(row_multiple),
        share_prompt=share_prompt,
    )


def real_tokens(batch: dict) -> int:
    """Non-padding tokens of a process-local batch, packed or not (throughput counts these)."""
    if "segment_ids" in batch:
        return int((batch["segment_ids"] != 0).sum())  # shared prompts (< 0) are real tokens too
    valid = batch["valid"].astype(bool)
    return int((batch["last_index"][valid] + 1).sum())
