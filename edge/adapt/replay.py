"""Latent replay: a reservoir of past (features, label) pairs, bounded in bytes.

Mixing old features into every training step is what keeps an adapting head from
forgetting the conditions it no longer sees. The buffer stores features, never raw
windows, so replay never runs the backbone.

For classification the reservoir is class-balanced (CBRS, Chrysakis & Moens, ICML
2020): while the buffer has room everything is kept; once full, a sample of a class
that is not among the largest evicts a random sample of the largest class, and a
sample of a largest class replaces a random member of its own class with probability
``kept / seen``. A rare fault class therefore keeps its share even when the stream is
99% "normal". For regression and forecasting it is a plain reservoir (Vitter's R).

Storage is two preallocated arrays, so sampling a batch is one numpy fancy index. The
sampled slots come from ``PreDrawn``: random numbers drawn in blocks, so that a batch
costs a slice and a modulo instead of a generator call.
"""
from __future__ import annotations

import numpy as np


class PreDrawn:
    """Uniform random slots ``0..size-1``, from blocks of random 62-bit integers drawn ahead.

    A numpy ``Generator.integers`` call costs about 3 microseconds whatever its size; a
    slice and a modulo of a block drawn ahead cost about 0.5 (the per-label step draws
    twice). The modulo's bias is below ``size / 2**62``. The state is the generator's
    state at the current block's start and the position in it, so a restored buffer
    draws the same slots as the one that was saved.

    >>> a = PreDrawn(seed=1)
    >>> first = a.slots(3, 10)
    >>> b = PreDrawn(seed=2)
    >>> b.load_state_dict(a.state_dict())
    >>> a.slots(4, 10).tolist() == b.slots(4, 10).tolist(), bool((first < 10).all())
    (True, True)
    """

    BLOCK = 4096

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self._refill(self.BLOCK)

    def _refill(self, length: int) -> None:
        self._start = self.rng.bit_generator.state
        self.block = self.rng.integers(0, 1 << 62, size=length)
        self.pos = 0

    def slots(self, n: int, size: int) -> np.ndarray:
        if self.pos + n > len(self.block):
            self._refill(max(self.BLOCK, n))
        out = self.block[self.pos: self.pos + n] % size
        self.pos += n
        return out

    def state_dict(self) -> dict:
        return {"rng": self._start, "pos": self.pos, "len": len(self.block)}

    def load_state_dict(self, s: dict) -> None:
        pos, length = int(s["pos"]), int(s["len"])
        if not 0 <= pos <= length:
            raise ValueError(f"random-draw state has position {pos} outside its block of {length}")
        self.rng.bit_generator.state = s["rng"]
        self._refill(length)
        self.pos = pos


class ReplayBuffer:
    """Class-balanced (or plain) reservoir of features ``z [D]`` and targets.

    >>> buf = ReplayBuffer(feature_size=4, max_bytes=10 * (4 * 4 + 8), classes=2, seed=0)
    >>> for i in range(100):
    ...     buf.add(np.full(4, i, np.float32), 0 if i < 95 else 1)
    >>> len(buf), buf.class_counts().tolist()
    (10, [5, 5])
    """

    def __init__(self, *, feature_size: int, max_bytes: int, classes: int | None = None, outputs: int = 1, seed: int = 0):
        self.feature_size = int(feature_size)
        self.classes = classes
        self.outputs = int(outputs)
        row = 4 * self.feature_size + (8 if classes else 4 * self.outputs)
        self.capacity = max(1, int(max_bytes) // row)
        self.z = np.zeros((self.capacity, self.feature_size), np.float32)
        self.y = np.zeros(self.capacity, np.int64) if classes else np.zeros((self.capacity, self.outputs), np.float32)
        self.size = 0
        self.rng = np.random.default_rng(seed)  # the reservoir's decisions
        self.draws = PreDrawn([seed, 1])  # the slots a batch replays
        self.seen = np.zeros(classes if classes else 1, np.int64)
        # slots of each class, for O(1) eviction of a random member of a class
        self._slots: list[list[int]] = [[] for _ in range(classes)] if classes else []

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        return self.z.nbytes + self.y.nbytes

    def class_counts(self) -> np.ndarray:
        if not self.classes:
            return np.array([self.size])
        return np.array([len(s) for s in self._slots])

    def add(self, z, y) -> None:
        """Offer one sample; it is kept or not by the reservoir rule."""
        if self.classes:
            self._add_balanced(z, int(y))
        else:
            self._add_plain(z, y)

    def add_many(self, Z: np.ndarray, Y) -> None:
        """Offer a batch, by the same rule as ``add`` row by row: rows that find room are
        stored at once; beyond that the plain reservoir draws all its slots at once and the
        class-balanced one goes row by row (its rule is sequential, its draws those of ``add``)."""
        m = len(Z)
        free = min(m, self.capacity - self.size)
        y = np.asarray(Y, np.int64).reshape(-1) if self.classes else np.asarray(Y).reshape(m, -1)
        if free:
            s = self.size
            self.z[s: s + free] = Z[:free]
            self.y[s: s + free] = y[:free]
            self.size += free
            if self.classes:
                np.add.at(self.seen, y[:free], 1)
                for slot, k in enumerate(y[:free].tolist(), start=s):
                    self._slots[k].append(slot)
        if self.classes:
            for i in range(free, m):
                self._add_balanced(Z[i], int(y[i]))
            return
        seen = self.seen[0] + free + 1 + np.arange(m - free)
        self.seen[0] += m
        if m > free:
            j = (self.rng.random(m - free) * seen).astype(np.int64)
            keep = j < self.capacity
            self.z[j[keep]] = Z[free:][keep]
            self.y[j[keep]] = y[free:][keep]

    def _add_plain(self, z, y) -> None:
        self.seen[0] += 1
        if self.size < self.capacity:
            slot = self.size
            self.size += 1
        else:
            j = int(self.rng.integers(0, self.seen[0]))
            if j >= self.capacity:
                return
            slot = j
        self.z[slot] = z
        self.y[slot] = y

    def _add_balanced(self, z, c: int) -> None:
        self.seen[c] += 1
        if self.size < self.capacity:
            slot = self.size
            self.size += 1
        else:
            counts = [len(s) for s in self._slots]  # plain ints: a handful of classes
            largest = max(counts)
            if counts[c] < largest:
                big = [k for k, n in enumerate(counts) if n == largest]
                victim = big[int(self.rng.integers(0, len(big)))]
                slot = self._evict(victim)
            else:
                if self.rng.random() * self.seen[c] >= counts[c]:
                    return
                slot = self._evict(c)
        self.z[slot] = z
        self.y[slot] = c
        self._slots[c].append(slot)

    def _evict(self, c: int) -> int:
        slots = self._slots[c]
        i = int(self.rng.integers(0, len(slots)))
        slots[i], slots[-1] = slots[-1], slots[i]
        return slots.pop()

    def sample_indices(self, n: int) -> np.ndarray:
        """``n`` random slots (with replacement: cheap and unbiased); empty when the buffer is."""
        if self.size == 0 or n <= 0:
            return np.empty(0, np.int64)
        return self.draws.slots(n, self.size)

    def clear(self) -> None:
        self.size = 0
        self.seen[:] = 0
        for s in self._slots:
            s.clear()

    def state_dict(self) -> dict:
        return {
            "z": self.z[: self.size].copy(),
            "y": self.y[: self.size].copy(),
            "seen": self.seen.copy(),
            "rng": self.rng.bit_generator.state,
            "draws": self.draws.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        z, y = np.asarray(state["z"], np.float32), np.asarray(state["y"])
        n = min(len(z), self.capacity)  # a smaller budget after a config change keeps the first n
        if z.ndim != 2 or z.shape[1] != self.feature_size:
            raise ValueError(f"replay state has features {z.shape}, expected [*, {self.feature_size}]")
        _check_targets(y[:n], self.classes, "replay")
        self.clear()
        self.z[:n], self.y[:n] = z[:n], y[:n]
        self.size = n
        self.seen[:] = np.asarray(state["seen"])[: len(self.seen)]
        if self.classes:
            for slot in range(n):
                self._slots[int(self.y[slot])].append(slot)
        if isinstance(state.get("rng"), dict):
            self.rng.bit_generator.state = state["rng"]
        if isinstance(state.get("draws"), dict):  # an older state has none: fresh draws
            self.draws.load_state_dict(state["draws"])


class RecentBuffer:
    """The last ``size`` labelled samples, FIFO: the fresh half of a replay batch.

    The reservoir alone remembers too well: right after a drift nearly all of it is the
    old condition, and the new one would get ~1/batch of every step. Drawing part of
    each batch from the recent labels makes the head adapt within tens of labels, while
    the reservoir part keeps the old conditions from being forgotten.

    >>> r = RecentBuffer(feature_size=2, size=2, classes=3)
    >>> for i in range(3):
    ...     r.add(np.full(2, i, np.float32), i)
    >>> sorted(r.y[: len(r)].tolist())
    [1, 2]
    """

    def __init__(self, *, feature_size: int, size: int, classes: int | None = None, outputs: int = 1, seed: int = 0):
        self.capacity = max(1, int(size))
        self.classes = classes
        self.z = np.zeros((self.capacity, int(feature_size)), np.float32)
        self.y = np.zeros(self.capacity, np.int64) if classes else np.zeros((self.capacity, int(outputs)), np.float32)
        self.size = 0
        self.i = 0
        self.draws = PreDrawn([seed, 2])

    def __len__(self) -> int:
        return self.size

    def add(self, z, y) -> None:
        self.z[self.i] = z
        self.y[self.i] = y
        self.i = (self.i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def add_many(self, Z: np.ndarray, Y) -> None:
        m = len(Z)
        if m >= self.capacity:
            Z, Y, m = Z[-self.capacity:], Y[-self.capacity:], self.capacity
        slots = (self.i + np.arange(m)) % self.capacity
        self.z[slots] = Z
        self.y[slots] = np.asarray(Y).reshape(self.y[slots].shape)
        self.i = int((self.i + m) % self.capacity)
        self.size = min(self.size + m, self.capacity)

    def sample_indices(self, n: int) -> np.ndarray:
        if self.size == 0 or n <= 0:
            return np.empty(0, np.int64)
        return self.draws.slots(n, self.size)

    def clear(self) -> None:
        self.size = self.i = 0

    def state_dict(self) -> dict:
        return {"z": self.z[: self.size].copy(), "y": self.y[: self.size].copy(), "i": self.i, "draws": self.draws.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the saved rows in time order into slots ``0..n-1`` (the newest ``capacity``
        when it shrank), so that a capacity changed by ``[adapt] batch`` never counts an
        empty slot as a row, and the next row overwrites the oldest."""
        z, y = np.asarray(state["z"], np.float32), np.asarray(state["y"])
        m = len(z)
        if z.ndim != 2 or z.shape[1] != self.z.shape[1] or len(y) != m:
            raise ValueError(f"recent-buffer state has features {z.shape} and {len(y)} targets, "
                             f"expected [*, {self.z.shape[1]}] and one target a row")
        _check_targets(y, self.classes, "recent-buffer")
        if m == self.capacity:  # the same size: the same slots, so a restored learner continues exactly
            order, self.i = np.arange(m), int(state["i"]) % m
        else:  # a full ring's oldest row is at its write position; a part-filled one starts at 0
            order = (np.roll(np.arange(m), -(int(state["i"]) % m)) if m else np.arange(0))[-self.capacity:]
            self.i = len(order) % self.capacity
        n = len(order)
        self.z[:n], self.y[:n] = z[order], y[order].reshape(self.y[:n].shape)
        self.size = n
        if isinstance(state.get("draws"), dict):  # an older state's "rng" drew slots another way: fresh draws
            self.draws.load_state_dict(state["draws"])


def _check_targets(y: np.ndarray, classes: int | None, what: str) -> None:
    """A saved class index outside ``0..classes-1`` is an inconsistent state (ValueError),
    caught by the learner's all-or-nothing restore, not an IndexError later."""
    if classes and len(y) and (np.min(y) < 0 or np.max(y) >= classes or np.any(np.mod(y, 1) != 0)):
        raise ValueError(f"{what} state has class labels outside 0..{classes - 1}")
