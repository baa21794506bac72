"""Synthetic in-context-learning tasks: associative recall, induction head, multi-query associative recall.

The token ids and layouts below are fixed for the project (docs/tasks.md), so that examples made by any
tool can be scored by any other. V is `SyntheticTask.vocab_size`, L is `SyntheticTask.seq_len`.

Common layout
-------------
Every task is a token sequence `full` of T + 1 ids. The model reads `inputs = full[:, :T]` and is trained to
predict the next token, so `targets = full[:, 1:]`: targets[:, t] is what the model must predict after reading
inputs[:, :t+1], aligned with its logits exactly as `H3LM(input_ids, labels=targets)` expects. Every position
has a next token, so the targets hold no -100 (the paper trains with the loss on every position).
`graded` (n, T) bool marks the positions whose accuracy counts; `Examples.graded_targets()` gives targets with
-100 everywhere else, for a loss on the answers only.

Associative recall ("associative_recall"; paper: V = 10, L = 20; V even, L even)
    keys 0 .. V/2-1, values V/2 .. V-1, COPY = V; model vocabulary V + 1.
    Per sequence a random key -> value map (each key's value drawn uniformly from the values; two keys may
    share a value). L/2 pairs `k v` with keys drawn uniformly (keys may repeat, always with their mapped
    value), then COPY, then a query key q = the key of a uniformly chosen pair.
    inputs: k1 v1 k2 v2 ... k_{L/2} v_{L/2} COPY q        (T = L + 2)
    graded: the last position only (index L + 1); its target is q's value. Random guessing: 1 / (V/2).

Induction head ("induction_head"; paper: V = 20, L = 30; L >= 3)
    ordinary tokens 0 .. V-1, COPY = V; model vocabulary V + 1.
    L tokens drawn uniformly from 0 .. V-1; the token at a uniform position p in 0 .. L-3 (p < L - 2) is
    replaced by COPY, the token after it is t; the sequence ends with one more COPY.
    inputs: x_0 .. x_{p-1} COPY t x_{p+2} .. x_{L-1} COPY  (T = L + 1)
    COPY appears exactly twice (positions p and L), so t = inputs[p + 1] is unambiguous.
    graded: the last position only (index L); its target is t. Random guessing: 1 / V.

Multi-query associative recall ("mqar"; Zoology grid: V = 8192, (L, pairs) = (64, 4), (128, 8), (256, 16))
    filler 0, keys 1 .. V/2-1, values V/2 .. V-1; model vocabulary V (as in Zoology, whose constant filler is
    also 0, which is why keys start at 1). V even.
    n = num_pairs distinct keys with values drawn uniformly, laid out first: k1 v1 ... kn vn. The rest of
    `full` (L + 1 - 2n tokens) holds S = (L + 1 - 2n) // 2 two-token slots starting at 2n, 2n + 2, ...
    num_queries (default n: every key) distinct keys, in random order, are put at distinct uniformly chosen
    slots as `k v` (the query key followed by its value); every other token is the filler 0.
    inputs: k1 v1 ... kn vn 0 0 k_a v_a 0 0 0 0 k_b v_b 0 ...   (T = L)
    graded: the query positions (where a query key sits after the first 2n tokens); the target there is
    the key's value (it is also the next input token, except for a query at the last input position).
    Any key id after position 2n is a query, so graded can be recovered from the inputs alone.
    Random guessing: 1 / (V/2). Differences from Zoology: uniform (not power-law) query distances, and the
    value is placed after each query so the targets are the plain next tokens.

Files of examples
-----------------
`save_examples` writes, and `load_examples` reads, a NumPy .npz archive with three arrays of shape (n, T):
`inputs` and `targets` (integer ids) and `graded` (bool), laid out as above. Examples made by any tool in
that layout can be scored with `hippos eval synthetic --model DIR --examples FILE.npz`.

Everything is drawn from an explicitly seeded torch.Generator (never the global RNG), so a seed fixes the data.
This module depends only on torch, numpy and the standard library.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

TASK_NAMES = ("associative_recall", "induction_head", "mqar")
IGNORE_INDEX = -100  # target value for "nothing to predict" (PyTorch cross_entropy's ignore_index)


@dataclass(frozen=True)
class SyntheticTask:
    """One synthetic task and its size; see the module docstring for the exact formats."""

    name: str  # "associative_recall" | "induction_head" | "mqar"
    vocab_size: int  # the task's V: AR 10, induction 20, MQAR 8192 in the paper settings
    seq_len: int  # the L: AR 20 pair tokens, induction 30 drawn tokens, MQAR the whole input length
    num_pairs: int = 0  # MQAR: key-value pairs; AR: 0 (means seq_len // 2) or seq_len // 2; induction: 0
    num_queries: int | None = None  # MQAR: keys queried again (None: all num_pairs); None for the others

    def __post_init__(self):
        """Refuse an unknown task or sizes its format cannot hold, with a ValueError that says what to change."""
        if self.name not in TASK_NAMES:
            raise ValueError(f"unknown synthetic task {self.name!r}; choose one of {', '.join(TASK_NAMES)}")
        for field in ("vocab_size", "seq_len", "num_pairs"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{field} must be an int, got {value!r}")
        if self.name != "mqar" and self.num_queries is not None:
            raise ValueError(f"num_queries is for mqar only; leave it None for {self.name}")
        getattr(self, f"_check_{self.name}")()  # _check_associative_recall, _check_induction_head, _check_mqar

    def _check_associative_recall(self) -> None:
        """Associative recall: even V (keys and values halves), even L, L/2 pairs."""
        V, L = self.vocab_size, self.seq_len
        if V < 2 or V % 2:
            raise ValueError(f"associative_recall needs an even vocab_size >= 2 (keys and values halves), got {V}")
        if L < 2 or L % 2:
            raise ValueError(f"associative_recall needs an even seq_len >= 2 (L/2 key-value pairs), got {L}")
        if self.num_pairs not in (0, L // 2):
            raise ValueError(
                f"associative_recall has seq_len // 2 = {L // 2} pairs; leave num_pairs 0, got {self.num_pairs}"
            )

    def _check_induction_head(self) -> None:
        """Induction head: V >= 1, room for COPY at p < L - 2, no pairs."""
        if self.vocab_size < 1:
            raise ValueError(f"induction_head needs vocab_size >= 1, got {self.vocab_size}")
        if self.seq_len < 3:
            raise ValueError(f"induction_head needs seq_len >= 3 (COPY at a position p < L - 2), got {self.seq_len}")
        if self.num_pairs != 0:
            raise ValueError(f"induction_head has no key-value pairs; leave num_pairs 0, got {self.num_pairs}")

    def _check_mqar(self) -> None:
        """MQAR: even V with room for n distinct keys, the pairs and every query within L."""
        V, L, n, q = self.vocab_size, self.seq_len, self.num_pairs, self.num_queries
        if V < 4 or V % 2:
            raise ValueError(f"mqar needs an even vocab_size >= 4 (filler, keys, values), got {V}")
        if n < 1:
            raise ValueError(f"mqar needs num_pairs >= 1, got {n}")
        if n > V // 2 - 1:
            raise ValueError(
                f"mqar needs {n} distinct keys but vocab_size {V} has only {V // 2 - 1} (ids 1 .. {V // 2 - 1}); "
                "raise vocab_size or lower num_pairs"
            )
        if 2 * n > L:
            raise ValueError(f"mqar: {n} pairs take {2 * n} tokens, more than seq_len {L}")
        if q is not None and (not isinstance(q, int) or isinstance(q, bool) or not 1 <= q <= n):
            raise ValueError(f"mqar num_queries must be an int in 1 .. num_pairs = {n}, got {q!r}")
        slots = (L + 1 - 2 * n) // 2
        if self.queries > slots:
            raise ValueError(
                f"mqar: seq_len {L} leaves room for {slots} queries after {n} pairs, but {self.queries} are "
                f"asked for; use seq_len >= {2 * n + 2 * self.queries - 1} or fewer num_queries"
            )

    @property
    def pairs(self) -> int:
        """Key-value pairs per sequence (AR: seq_len // 2; MQAR: num_pairs; induction: 0)."""
        return self.seq_len // 2 if self.name == "associative_recall" else self.num_pairs

    @property
    def queries(self) -> int:
        """Graded positions per sequence: 1 for AR and induction, num_queries (default num_pairs) for MQAR."""
        if self.name != "mqar":
            return 1
        return self.num_pairs if self.num_queries is None else self.num_queries

    @property
    def input_len(self) -> int:
        """T, the number of tokens fed to the model: AR L + 2, induction L + 1, MQAR L."""
        return {"associative_recall": self.seq_len + 2, "induction_head": self.seq_len + 1}.get(self.name, self.seq_len)

    @property
    def copy_token(self) -> int | None:
        """The COPY id (V) for AR and induction; None for MQAR."""
        return None if self.name == "mqar" else self.vocab_size

    @property
    def filler_token(self) -> int | None:
        """The MQAR filler id (0); None for AR and induction."""
        return 0 if self.name == "mqar" else None

    @property
    def model_vocab_size(self) -> int:
        """Ids the model must handle: V + 1 with COPY (AR, induction), V for MQAR."""
        return self.vocab_size if self.name == "mqar" else self.vocab_size + 1

    @property
    def random_guess(self) -> float:
        """Accuracy of guessing uniformly among the possible answers: 1/(V/2) AR and MQAR, 1/V induction."""
        return 1.0 / self.vocab_size if self.name == "induction_head" else 1.0 / (self.vocab_size // 2)


# The paper's settings (H3 Table 1) and the Zoology MQAR grid.
PAPER_TASKS: dict[str, SyntheticTask] = {
    "associative_recall": SyntheticTask("associative_recall", vocab_size=10, seq_len=20),
    "induction_head": SyntheticTask("induction_head", vocab_size=20, seq_len=30),
    "mqar_64": SyntheticTask("mqar", vocab_size=8192, seq_len=64, num_pairs=4),
    "mqar_128": SyntheticTask("mqar", vocab_size=8192, seq_len=128, num_pairs=8),
    "mqar_256": SyntheticTask("mqar", vocab_size=8192, seq_len=256, num_pairs=16),
}


class Examples(NamedTuple):
    """A batch of examples; unpacks as `inputs, targets, graded = examples`."""

    inputs: Tensor  # (n, T) int64 token ids fed to the model
    targets: Tensor  # (n, T) int64 next-token targets aligned with the logits (-100: nothing to predict)
    graded: Tensor  # (n, T) bool, positions whose accuracy counts (AR, induction: the last; MQAR: queries)

    @property
    def num_examples(self) -> int:
        return self.inputs.shape[0]

    def answers(self) -> Tensor:
        """The graded targets as a flat (n * task.queries,) tensor, in row-major order."""
        return self.targets[self.graded]

    def graded_targets(self) -> Tensor:
        """Targets with -100 outside the graded positions, for a loss on the answers only."""
        return self.targets.masked_fill(~self.graded, IGNORE_INDEX)

    def select(self, index) -> Examples:
        """The examples at `index` (an int slice, index tensor or boolean mask over the first dim)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Examples(self.inputs[index], self.targets[index], self.graded[index])

    def to(self, device) -> Examples:
        """The same examples on `device`."""
        return Examples(self.inputs.to(device), self.targets.to(device), self.graded.to(device))


def _generator(seed: int, stream: int) -> torch.Generator:
    """A torch.Generator for (seed, stream), the two mixed by numpy's SeedSequence (independent streams)."""
    state = np.random.SeedSequence(entropy=seed, spawn_key=(stream,)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def _check_count(value, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} must be a non-negative int, got {value!r}")


def _interleave(a: Tensor, b: Tensor) -> Tensor:
    """(n, m), (n, m) -> (n, 2m): a0 b0 a1 b1 ..."""
    return torch.stack((a, b), dim=2).flatten(1)


def _associative_recall(task: SyntheticTask, n: int, g: torch.Generator) -> Tensor:
    K, P = task.vocab_size // 2, task.pairs
    value_of = torch.randint(K, 2 * K, (n, K), generator=g)  # the key -> value map of each sequence
    keys = torch.randint(0, K, (n, P), generator=g)
    values = value_of.gather(1, keys)
    pick = torch.randint(0, P, (n, 1), generator=g)
    query = keys.gather(1, pick)
    copy = torch.full((n, 1), task.copy_token, dtype=torch.long)
    return torch.cat((_interleave(keys, values), copy, query, value_of.gather(1, query)), dim=1)


def _induction_head(task: SyntheticTask, n: int, g: torch.Generator) -> Tensor:
    L, copy = task.seq_len, task.copy_token
    drawn = torch.randint(0, task.vocab_size, (n, L), generator=g)
    p = torch.randint(0, L - 2, (n, 1), generator=g)
    answer = drawn.gather(1, p + 1)
    drawn.scatter_(1, p, copy)
    return torch.cat((drawn, torch.full((n, 1), copy, dtype=torch.long), answer), dim=1)


def _distinct_keys(n: int, count: int, low: int, high: int, g: torch.Generator) -> Tensor:
    """(n, count) distinct ids per row, uniform from low .. high-1, in random order (chunked to bound memory)."""
    width = high - low
    rows = max(1, (1 << 22) // width)
    chunks = [torch.rand(min(rows, n - i), width, generator=g).topk(count, dim=1).indices for i in range(0, n, rows)]
    return torch.cat(chunks).add_(low) if chunks else torch.empty(0, count, dtype=torch.long)


def _mqar(task: SyntheticTask, n: int, g: torch.Generator) -> Tensor:
    V, L, P, Q = task.vocab_size, task.seq_len, task.num_pairs, task.queries
    K = V // 2
    keys = _distinct_keys(n, P, 1, K, g)
    values = torch.randint(K, V, (n, P), generator=g)
    full = torch.full((n, L + 1), task.filler_token, dtype=torch.long)
    full[:, : 2 * P] = _interleave(keys, values)
    which = torch.rand(n, P, generator=g).argsort(dim=1)[:, :Q]  # which keys are queried, in query order
    slots = torch.rand(n, (L + 1 - 2 * P) // 2, generator=g).argsort(dim=1)[:, :Q]  # where, distinct slots
    position = 2 * P + 2 * slots
    full.scatter_(1, position, keys.gather(1, which))
    full.scatter_(1, position + 1, values.gather(1, which))
    return full


def _graded(task: SyntheticTask, full: Tensor) -> Tensor:
    """AR, induction: the last input position. MQAR: every key id after the pairs (read from the inputs)."""
    n, T = full.shape[0], task.input_len
    if task.name == "mqar":
        inputs = full[:, :T]
        return (torch.arange(T) >= 2 * task.num_pairs) & (inputs >= 1) & (inputs < task.vocab_size // 2)
    graded = torch.zeros(n, T, dtype=torch.bool)
    graded[:, -1] = True
    return graded


def _examples(task: SyntheticTask, n: int, g: torch.Generator) -> Examples:
    make = {"associative_recall": _associative_recall, "induction_head": _induction_head, "mqar": _mqar}
    full = make[task.name](task, n, g)
    return Examples(full[:, :-1].contiguous(), full[:, 1:].contiguous(), _graded(task, full))


def make_examples(task: SyntheticTask, n: int, seed: int) -> Examples:
    """n random examples of `task`, fixed by `seed` (a non-negative int); see the module docstring for formats.

    Returns Examples(inputs, targets, graded), each (n, task.input_len): int64, int64, bool.
    """
    _check_count(n, "n")
    _check_count(seed, "seed")
    return _examples(task, n, _generator(seed, 0))


def make_splits(
    task: SyntheticTask, n_train: int, n_test: int, seed: int, max_rounds: int = 100
) -> tuple[Examples, Examples]:
    """Train and test sets that never share an input sequence, fixed by `seed`.

    The training set is exactly `make_examples(task, n_train, seed)`. Test examples come from independent
    streams of the same seed; any whose input sequence also appears in the training set is dropped and more
    are drawn, round after round, until n_test are kept (duplicates within the test set are allowed, as in
    i.i.d. draws). A task with too few distinct sequences for that raises a ValueError after `max_rounds`.
    """
    _check_count(n_train, "n_train")
    _check_count(n_test, "n_test")
    _check_count(seed, "seed")
    train = make_examples(task, n_train, seed)
    seen = {row.tobytes() for row in train.inputs.numpy()}
    kept: list[Examples] = []
    have = 0
    for round_ in range(max_rounds):
        if have >= n_test:
            break
        batch = _examples(task, max(2 * (n_test - have), 64), _generator(seed, 1 + round_))
        fresh = torch.tensor([row.tobytes() not in seen for row in batch.inputs.numpy()], dtype=torch.bool)
        fresh_idx = fresh.nonzero().flatten()[: n_test - have]
        kept.append(batch.select(fresh_idx))
        have += fresh_idx.numel()
    if have < n_test:
        raise ValueError(
            f"could not draw {n_test} test sequences unseen in {n_train} training ones after {max_rounds} rounds "
            f"(found {have}): {task} has too few distinct sequences; lower n_train/n_test or enlarge the task"
        )
    test = Examples(*(torch.cat(parts) for parts in zip(*kept))) if kept else make_examples(task, 0, seed)
    return train, test


def accuracy(
    logits: Tensor, targets: Tensor | Examples, graded: Tensor | None = None, *, vocab_size: int | None = None
) -> float:
    """Fraction of graded positions where argmax of the logits equals the target.

    logits (n, T, V'); targets (n, T) or an Examples (whose `graded` is then used); graded (n, T) bool, by
    default every position whose target is not -100. vocab_size: consider only the first vocab_size logits
    (pass task.model_vocab_size when the model's vocabulary is padded beyond it).
    """
    if isinstance(targets, Examples):
        if graded is None:
            graded = targets.graded
        targets = targets.targets
    if logits.dim() != 3 or logits.shape[:2] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be (n, T, vocab) with targets (n, T) = {tuple(targets.shape)}"
        )
    if graded is None:
        graded = targets != IGNORE_INDEX
    if graded.shape != targets.shape:
        raise ValueError(f"graded {tuple(graded.shape)} must match targets {tuple(targets.shape)}")
    if vocab_size is not None:
        if not 1 <= vocab_size <= logits.shape[-1]:
            raise ValueError(f"vocab_size {vocab_size} must be in 1 .. {logits.shape[-1]} (the logits' last dim)")
        logits = logits[..., :vocab_size]
    graded = graded.to(torch.bool)
    count = int(graded.sum())
    if count == 0:
        raise ValueError("no graded positions to score")
    correct = logits.argmax(dim=-1).eq(targets.to(logits.device)) & graded.to(logits.device)
    return int(correct.sum()) / count


def save_examples(path, examples: Examples) -> None:
    """Write examples as a .npz archive of `inputs`, `targets` (int64) and `graded` (bool), each (n, T)."""
    np.savez(path, inputs=examples.inputs.numpy(), targets=examples.targets.numpy(), graded=examples.graded.numpy())


def load_examples(path) -> Examples:
    """Read a .npz archive of `inputs`, `targets` and `graded` (n, T) arrays, checking names, shapes and types."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in ("inputs", "targets", "graded") if name in archive.files}
    except (zipfile.BadZipFile, EOFError, ValueError) as err:  # numpy's words for a cut-off or foreign file
        raise ValueError(f"{path} is not a .npz archive of examples, or it is truncated ({err})") from None
    missing = {"inputs", "targets", "graded"} - set(arrays)
    if missing:
        raise ValueError(f"{path} lacks the array(s) {sorted(missing)}; it needs inputs, targets and graded")
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"{path}: inputs, targets and graded must share one (n, T) shape, got {sorted(shapes)}")
    for name in ("inputs", "targets"):
        if not np.issubdtype(arrays[name].dtype, np.integer):
            raise ValueError(f"{path}: {name} must hold integer token ids, got {arrays[name].dtype}")
    if arrays["graded"].dtype != np.bool_:
        raise ValueError(f"{path}: graded must be a bool array, got {arrays['graded'].dtype}")
    return Examples(*(torch.from_numpy(arrays[n].astype(np.int64)) for n in ("inputs", "targets")),
                    torch.from_numpy(arrays["graded"]))  # fmt: skip
