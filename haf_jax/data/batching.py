"""Batches of pairs and the resumable, host-sharded, prefetching iterator.

Batch (dict of NumPy arrays, process-local; B = global batch size / process_count)::

    tokens         int32 [B, 2, L]  pair axis: 0 = chosen, 1 = rejected; right-padded with pad id
    response_mask  int32 [B, 2, L]  1 on the response tokens incl. the final EOS
    last_index     int32 [B, 2]     position of the last real token (the EOS)
    valid          bool  [B]        False for filler pairs (only in `PairDataset.batches`)
    index          int64 [B]        pair index in the dataset (-1 for filler)

L is the smallest of `length_buckets(max_length)` that fits the longest pair of the GLOBAL batch
(identical on every process), so a run compiles a handful of shapes at most.

Sharding: process p owns the pairs with ``index % process_count == p`` and only tokenises those.
`PairLoader`: every process permutes its own pairs with ``(seed, epoch, p)``; with length grouping
(``batching="length_grouped"``, the default) each run of `GROUP_BATCHES` local batches is sorted by
length before being cut into batches, and the order of the batches is permuted with ``(seed,
epoch)`` (the same on every process, so the k-th local batches of all processes have similar
lengths). With ``batching="random"`` (the paper authors' random sampler; config key
``data.batching``) batch k is simply the k-th run of the permutation, whatever the lengths; only
the padded length L then varies more (padding never changes a number). Global batch k = the
concatenation of the processes' k-th local batches; over an epoch the processes see disjoint pairs
whose union is the epoch (all pairs when the pair count is a multiple of the batch size; the
remainder is dropped, a different remainder every epoch).
"""

from __future__ import annotations

import queue
import threading

import numpy as np

from haf_jax.data.errors import DataError

GROUP_BATCHES = 32  # local batches per length-sorted group
BATCHING = ("length_grouped", "random")  # data.batching: PairLoader's length grouping on / off


def length_buckets(max_length: int, min_bucket: int = 64) -> list[int]:
    """Sorted static lengths: 2^k and 1.5 * 2^k from `min_bucket` up to, and always incl., max_length."""
    out, b = set(), min_bucket
    while b < max_length:
        out.update(x for x in (b, b * 3 // 2) if x < max_length)
        b *= 2
    out.add(max_length)
    return sorted(out)


def bucket_for(length: int, buckets: list[int]) -> int:
    """Smallest bucket >= length."""
    i = int(np.searchsorted(buckets, length))
    return buckets[min(i, len(buckets) - 1)]


def make_batch(ds, indices: np.ndarray, length: int) -> dict:
    """Build a process-local batch for global pair `indices` (-1 = filler) padded to `length`.

    Every non-filler index must be owned by this process (index % process_count == process_index).
    """
    b = len(indices)
    tokens = np.full((b, 2, length), ds.pad_id, np.int32)
    mask = np.zeros((b, 2, length), np.int32)
    last = np.zeros((b, 2), np.int32)
    valid = indices >= 0
    real = np.flatnonzero(valid)
    fill_from = real[0] if len(real) else None
    tp = ds.tokens
    for row, gi in enumerate(indices):
        src = gi if gi >= 0 else (indices[fill_from] if fill_from is not None else ds.local_indices[0])
        j = ds.local_position(int(src))
        prompt = tp.prompt[j]
        n_p = len(prompt)
        for side, resp in enumerate((tp.chosen[j], tp.rejected[j])):
            end = n_p + len(resp)
            tokens[row, side, :n_p] = prompt
            tokens[row, side, n_p:end] = resp
            mask[row, side, n_p:end] = 1
            last[row, side] = end - 1
    return {
        "tokens": tokens,
        "response_mask": mask,
        "last_index": last,
        "valid": valid,
        "index": np.where(valid, indices, -1).astype(np.int64),
    }


def in_order_batches(ds, batch_size: int):
    """One in-order pass over all pairs; the last global batch is completed with filler pairs
    (valid=False). With several processes, each yields its pairs of each global batch, in order,
    then filler; the rows of a global batch are thus process-major (use "index" to reorder)."""
    p, n_proc = ds.process_index, ds.process_count
    b_local = _local_size(batch_size, n_proc)
    n = len(ds)
    pair_len = ds.all_lengths.max(axis=1)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        idx = np.arange(start, stop, dtype=np.int64)
        mine = idx[idx % n_proc == p]
        local = np.full(b_local, -1, np.int64)
        local[: len(mine)] = mine
        yield make_batch(ds, local, bucket_for(int(pair_len[start:stop].max()), ds.buckets))


def subset_batches(ds, indices: np.ndarray, batch_size: int):
    """Global batches of `batch_size` pairs holding only the pairs `indices` (int64 [K], sorted), each
    padded to the length `in_order_batches` gives it (the bucket of its in-order batch): a pair is
    computed in the same [B, 2, L] shape as in a full in-order pass, so a partial pass (the reference
    of only the pairs a run visits) gives the full pass's numbers. Process-local batches, rows
    process-major as in `in_order_batches`; the last batch of each length is completed with filler."""
    p, n_proc = ds.process_index, ds.process_count
    b_local = _local_size(batch_size, n_proc)
    pair_len = ds.all_lengths.max(axis=1)
    indices = np.asarray(indices, np.int64)
    starts = (indices // batch_size) * batch_size  # the in-order batch each pair is in
    lengths = np.array(
        [bucket_for(int(pair_len[s : s + batch_size].max()), ds.buckets) for s in starts], np.int64
    ).reshape(-1)
    for length in sorted(set(lengths.tolist())):
        same = indices[lengths == length]
        for start in range(0, len(same), batch_size):
            idx = same[start : start + batch_size]
            mine = idx[idx % n_proc == p]
            local = np.full(b_local, -1, np.int64)
            local[: len(mine)] = mine
            yield make_batch(ds, local, length)


def _local_size(batch_size: int, process_count: int) -> int:
    if batch_size <= 0 or batch_size % process_count:
        raise DataError(
            f"global batch size {batch_size} must be a positive multiple of the process count {process_count}"
        )
    return batch_size // process_count


class PairLoader:
    """Infinite, per-epoch reshuffled, resumable iterator of training batches (drops partial ones).

    ``state`` -> {"epoch", "position", "seed", "num_pairs"} counts batches already returned;
    ``restore(state)`` continues exactly from there. Batches are built by a background thread
    `prefetch` batches ahead; call `close()` (or use as a context manager) to stop it early.
    ``length_grouping=None`` (default) takes the dataset's ``batching`` ("length_grouped" unless
    `load_pairs` was given ``batching="random"``).
    """

    def __init__(
        self,
        ds,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        length_grouping: bool | None = None,
        prefetch: int = 4,
    ):
        if length_grouping is None:
            length_grouping = getattr(ds, "batching", "length_grouped") == "length_grouped"
        self.ds, self.batch_size, self.seed = ds, batch_size, int(seed)
        self.shuffle, self.length_grouping, self.prefetch = shuffle, length_grouping, prefetch
        self.b_local = _local_size(batch_size, ds.process_count)
        self.steps_per_epoch = len(ds) // batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"dataset has {len(ds)} pairs, fewer than one batch of {batch_size}")
        self._pair_len = ds.all_lengths.max(axis=1)  # what length grouping and the buckets go by
        self.buckets = ds.buckets
        self.epoch, self.position = 0, 0
        self._thread = self._queue = self._stop = None
        self._plan_cache = (None, None)

    # ---------------------------------------------------------------- plan
    def _local_plan(self, epoch: int, proc: int) -> np.ndarray:
        """Global indices of `proc`'s batches for `epoch`, before the shared batch order: [S, b]."""
        n, P = len(self.ds), self.ds.process_count
        owned = np.arange(proc, n, P, dtype=np.int64)
        take = self.steps_per_epoch * self.b_local
        if self.shuffle:
            owned = owned[np.random.default_rng([self.seed, epoch, proc]).permutation(len(owned))]
        owned = owned[:take]
        if self.length_grouping:
            g = GROUP_BATCHES * self.b_local
            parts = [
                c[np.argsort(self._pair_len[c], kind="stable")] for c in (owned[i : i + g] for i in range(0, take, g))
            ]
            owned = np.concatenate(parts)
        return owned.reshape(self.steps_per_epoch, self.b_local)

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices int64 [S, P, b] of every process, lengths int32 [S]) for one epoch."""
        if self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        per_proc = np.stack([self._local_plan(epoch, q) for q in range(self.ds.process_count)], 1)
        if self.shuffle and self.length_grouping:
            order = np.random.default_rng([self.seed, epoch, 1 << 30]).permutation(self.steps_per_epoch)
            per_proc = per_proc[order]
        longest = self._pair_len[per_proc.reshape(self.steps_per_epoch, -1)].max(axis=1)
        lengths = np.array([bucket_for(int(x), self.buckets) for x in longest], np.int32)
        self._plan_cache = (epoch, (per_proc, lengths))
        return per_proc, lengths

    def batch_at(self, epoch: int, position: int) -> dict:
        """The process-local batch number `position` of `epoch` (pure function of the state)."""
        idx, lengths = self.plan(epoch)
        return make_batch(self.ds, idx[position, self.ds.process_index], int(lengths[position]))

    def epoch_steps(self, epoch: int) -> int:
        """Batches in `epoch` (the same every epoch here; packing.PackedLoader's vary)."""
        return self.steps_per_epoch

    def pairs_of_steps(self, first: int, last: int) -> np.ndarray:
        """Sorted global indices (all processes) of the pairs in batches `first`..`last` (1-based steps
        counted from epoch 0, position 0; one batch a step): int64 [K]. A pure function of the seed,
        so a run knows before its first step which pairs it will visit."""
        seen, epoch, step = [], 0, 0
        while step < last:
            n = self.epoch_steps(epoch)
            lo, hi = max(first - 1 - step, 0), min(last - step, n)
            if lo < hi:
                seen.append(self.plan(epoch)[0][lo:hi].ravel())
            step, epoch = step + n, epoch + 1
            if len(seen) and step < last and len(np.unique(np.concatenate(seen))) >= len(self.ds):
                break  # every pair already visited: later epochs add none
        out = np.unique(np.concatenate(seen)) if seen else np.zeros(0, np.int64)
        return out[out >= 0]

    def padding(self, epoch: int = 0) -> dict:
        """Token counts of one epoch of this loader: padding fraction, pairs a step, batch shapes, and
        `tokens_vs_plain`, its row tokens over those of this (plain) loader's batches: 1 here; the
        packing loaders report theirs."""
        idx, lengths = self.plan(epoch)
        real = float(self.ds.all_lengths[idx.reshape(len(idx), -1)].sum())
        total = float(2 * self.batch_size * lengths.astype(np.int64).sum())
        shapes = ", ".join(f"{self.batch_size}x2x{n}" for n in sorted(set(lengths.tolist())))
        return {
            "padding_fraction": round(1 - real / total, 4),
            "pairs_per_step": float(self.batch_size),
            "steps": int(len(idx)),
            "shape": shapes,
            "tokens": total,
            "tokens_vs_plain": 1.0,
        }

    # ---------------------------------------------------------------- iteration
    @property
    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_pairs": len(self.ds)}

    def restore(self, state: dict) -> None:
        if state.get("num_pairs", len(self.ds)) != len(self.ds):
            raise DataError(
                f"loader state is for {state['num_pairs']} pairs, this dataset has "
                f"{len(self.ds)}: the data or its settings changed since the checkpoint"
            )
        self._stop_thread()
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._plan_cache = (None, None)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.prefetch <= 0:
            batch = self.batch_at(self.epoch, self.position)
        else:
            if self._thread is None:
                self._start_thread()
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._thread = None
                raise item
            batch = item
        self.position += 1
        if self.position == self.epoch_steps(self.epoch):
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def _start_thread(self):
        self._queue, self._stop = queue.Queue(self.prefetch), threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(self.epoch, self.position, self._stop), daemon=True, name="haf_jax-prefetch"
        )
        self._thread.start()

    def _produce(self, epoch, position, stop):
        q = self._queue
        try:
            while not stop.is_set():
                item = self.batch_at(epoch, position)
                position += 1
                if position == self.epoch_steps(epoch):
                    epoch, position = epoch + 1, 0
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
        except BaseException as e:  # surfaced in the consumer
            q.put(e)

    def _stop_thread(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._thread = self._queue = self._stop = None

    def close(self):
        self._stop_thread()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self._stop_thread()
        except Exception:
            pass
