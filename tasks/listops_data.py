"""ListOps data (Nangia & Bowman 2018, as Long Range Arena generates it): trees, labels, vocabulary.

A building block of the `listops` task, not a task: it registers nothing and imports only the
standard library, numpy and torch, because `import tasks` imports every module of `tasks/`.

Written from LRA's published description and generator (`lra_benchmarks/data/listops.py` in
google-research/long-range-arena), not copied from it:

- Operators MIN, MAX, MED, SM (sum modulo 10) over the digits 0-9. MED is LRA's
  `int(np.median(args))`: an even count takes the mean of the two middle values, rounded down
  (`[MED 0 9 ]` = 4).
- Bracketed prefix notation as LRA writes it: an operator opens with one token `[OP`, a `]` closes
  it, `[MAX 2 9 [MIN 4 7 ] 0 ]` = 9.
- The root is at depth 1; a node is an operator with probability 0.25 while depth < max_depth, else a
  digit; an operator takes 2..max_args arguments, uniformly. Trees are rejection-sampled until their
  token count (operators, digits and `]`) lies in [min_len, max_len]. LRA's own check is strict
  (`min_length < length < max_length`); this module's bounds are inclusive, which differs only at the
  two end points. LRA's setting: max_depth 10, max_args 10, lengths 500-2000, 96k/2k/2k unique trees.

Tokenisation: what LRA's pipeline does, and what this module does. LRA's TSV `Source` column is the
generator's `to_string`, which writes each operator as left-nested pairs in parentheses:
`[MAX 2 9 ]` is written `( ( ( [MAX 2 ) 9 ) ] )`. LRA's input pipeline
(`lra_benchmarks/listops/input_pipeline.py`) tokenises it with `tfds.deprecated.text.Tokenizer()` and
encodes with `TokenTextEncoder`, whose default tokenizer is `alphanum_only=True`: it splits on the
regex `\\W+` and drops every non-alphanumeric character. So LRA's code strips the parentheses, the
`[` of each operator, and also every closing `]`: the model sees `MAX 2 9` only (14 word types, plus
pad id 0 and one OOV id), and without the closing brackets a tree with variable-arity operators is
ambiguous (`MAX 1 MIN 2 3 4`: is 4 an argument of MIN or of MAX?). The PyTorch re-implementations
(S4's `listops_tokenizer`, followed by most later LRA papers) instead delete the parentheses and keep
`]` (renamed `X`), so the label is a function of the input. This module does the latter by default:
`tokenize` deletes `(` and `)` and splits on whitespace, keeping `[OP`, the digits and `]`.
`tokenize(text, keep_close=False)` (and `make_listops(..., keep_close=False)`) drops `]` as well, to
reproduce what LRA's code feeds its models.

The vocabulary is fixed (not built from data, so ids never depend on a set's iteration order as
LRA's do): pad 0, digits 1-10, operators 11-14, `]` 15.

Labels are computed twice, independently: the generator folds each operator as it closes it (with
`np.median` for MED, as LRA does), and `evaluate` parses the text with a stack and its own operator
code (a sort for MED). A test checks that the two agree on every generated tree.

Determinism: every draw comes from one `numpy.random.Generator` seeded by the arguments, so
`make_listops` is a pure function of them. `make_listops_splits` draws each split from its own
derived seed, generating test first, then validation excluding test, then train excluding both
(dedupe by the tree's text), so no tree is in two splits and the test split does not change when the
train size does.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch

MIN, MAX, MED, SM = "[MIN", "[MAX", "[MED", "[SM"
OPERATORS: tuple[str, ...] = (MIN, MAX, MED, SM)
CLOSE = "]"
DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))
VALUE_P = 0.25  # probability that a node above max_depth is an operator (LRA's VALUE_P)
NUM_CLASSES = 10

PAD = "<pad>"
PAD_ID = 0
VOCAB: tuple[str, ...] = (PAD, *DIGITS, *OPERATORS, CLOSE)
VOCAB_SIZE = len(VOCAB)
TOKEN_TO_ID: dict[str, int] = {tok: i for i, tok in enumerate(VOCAB)}

LRA_SETTING = dict(max_depth=10, max_args=10, min_len=500, max_len=2000)
LRA_SPLITS = dict(n_train=96_000, n_val=2_000, n_test=2_000)
SPLIT_SALTS = {"test": 1, "val": 2, "train": 3}  # each split draws from its own derived seed
_BUFFER = 1 << 15  # uniforms drawn from numpy per refill: one call per many tree nodes, not per node
_PARENS = re.compile(r"[()]")


@dataclass
class ListOpsData:
    """One split: `inputs` (n, max_len) int64 padded with PAD_ID, `labels` (n,) int64 in 0-9,
    `lengths` (n,) int64 (tokens before padding), `texts` the trees in bracket notation."""

    inputs: torch.Tensor
    labels: torch.Tensor
    lengths: torch.Tensor
    texts: list[str]

    def __len__(self) -> int:
        return len(self.texts)


# --- vocabulary ---------------------------------------------------------------------------------


def tokenize(text: str, keep_close: bool = True) -> list[str]:
    """Tokens of a tree in bracket notation or in LRA's TSV form (parentheses are deleted).

    `keep_close=False` also drops `]`, which is what LRA's own pipeline ends up feeding the model."""
    tokens = _PARENS.sub(" ", text).split()
    return tokens if keep_close else [t for t in tokens if t != CLOSE]


def encode(tokens: Sequence[str], length: int | None = None) -> torch.Tensor:
    """Token ids (int64), right-padded with PAD_ID to `length` when given.

    A sequence longer than `length` is an error rather than truncated (LRA truncates), because a
    truncated tree has no well-defined value."""
    try:
        ids = [TOKEN_TO_ID[t] for t in tokens]
    except KeyError as e:
        raise ValueError(f"unknown ListOps token {e.args[0]!r}; the vocabulary is {VOCAB[1:]}") from None
    if PAD_ID in ids:
        raise ValueError(f"tokens must not contain the pad token {PAD!r}")
    if length is None:
        return torch.tensor(ids, dtype=torch.int64)
    if len(ids) > length:
        raise ValueError(f"length={length} is shorter than the {len(ids)} tokens to encode")
    out = torch.full((length,), PAD_ID, dtype=torch.int64)
    out[: len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return out


def decode(ids: torch.Tensor | Sequence[int]) -> list[str]:
    """Tokens of a (padded) id sequence; pad ids are dropped."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    bad = [i for i in values if not 0 <= i < VOCAB_SIZE]
    if bad:
        raise ValueError(f"ids must be in [0, {VOCAB_SIZE}), got {bad[0]}")
    return [VOCAB[i] for i in values if i != PAD_ID]


# --- evaluator ----------------------------------------------------------------------------------


def _apply(op: str, args: list[int]) -> int:
    """The evaluator's operators, written apart from the generator's (sort, not np.median)."""
    if op == MIN:
        return min(args)
    if op == MAX:
        return max(args)
    if op == SM:
        return sum(args) % 10
    s = sorted(args)  # MED: int(np.median(s)); the values are >= 0 so int() is floor
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) // 2


def evaluate(tree: str | Sequence[str]) -> int:
    """The value of a tree given as text (bracket notation or LRA's TSV form) or as tokens.

    Parses with its own stack, independent of the generator, so that a test can check the labels."""
    tokens = tokenize(tree) if isinstance(tree, str) else list(tree)
    if not tokens:
        raise ValueError("empty ListOps tree")
    stack: list[tuple[str, list[int]]] = []
    result: int | None = None
    for pos, tok in enumerate(tokens):
        if result is not None:
            raise ValueError(f"token {tok!r} at {pos} follows a complete tree")
        if tok in OPERATORS:
            stack.append((tok, []))
            continue
        if tok == CLOSE:
            if not stack:
                raise ValueError(f"unmatched ']' at {pos}")
            op, args = stack.pop()
            if not args:
                raise ValueError(f"operator {op!r} closed with no arguments at {pos}")
            value = _apply(op, args)
        elif tok in DIGITS:
            value = int(tok)
        else:
            raise ValueError(f"unknown ListOps token {tok!r} at {pos}")
        if stack:
            stack[-1][1].append(value)
        else:
            result = value
    if result is None:
        raise ValueError(f"unclosed operator {stack[-1][0]!r}: the tree lacks {len(stack)} ']'")
    return result


# --- generator ----------------------------------------------------------------------------------


def max_tree_length(max_depth: int, max_args: int) -> int:
    """The longest tree (in tokens) that max_depth and max_args allow: every node above the last
    level an operator with max_args arguments."""
    length = 1
    for _ in range(max_depth - 1):
        length = 2 + max_args * length
    return length


def check_listops_args(n: int, seed: int, max_depth: int, max_args: int, min_len: int, max_len: int) -> None:
    """The generator's preconditions, each a one-line ValueError that names the argument."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got n={n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (numpy SeedSequence), got seed={seed}")
    if max_depth < 2:
        raise ValueError(f"max_depth must be >= 2 (depth 1 is the root; only a deeper tree has an operator), got max_depth={max_depth}")
    if max_args < 2:
        raise ValueError(f"max_args must be >= 2 (an operator takes 2..max_args arguments), got max_args={max_args}")
    if min_len < 1:
        raise ValueError(f"min_len must be >= 1, got min_len={min_len}")
    if min_len > max_len:
        raise ValueError(f"min_len must be <= max_len, got min_len={min_len} > max_len={max_len}")
    longest = max_tree_length(max_depth, max_args)
    if min_len > longest:
        raise ValueError(f"min_len={min_len} exceeds the longest tree max_depth={max_depth}, max_args={max_args} allow ({longest} tokens)")


def _sampler(rng: np.random.Generator, max_depth: int, max_args: int, max_len: int):
    """A function that draws one tree as (tokens, value), or None once it passes max_len tokens
    (rejected early: a tree already too long need not be finished).

    Draws as LRA does, one uniform per decision: operator-or-digit (operator when u <= VALUE_P and
    depth < max_depth), the operator (uniform over 4), its argument count (uniform over 2..max_args)
    and each digit (uniform over 0-9). Uniforms come from numpy in blocks, for speed."""
    buf: list[float] = []
    pos = 0
    n_counts = max_args - 1

    def draw() -> float:
        nonlocal buf, pos
        if pos == len(buf):
            buf, pos = rng.random(_BUFFER).tolist(), 0
        pos += 1
        return buf[pos - 1]

    def sample() -> tuple[list[str], int] | None:
        tokens: list[str] = []
        stack: list[tuple[str, int, list[int], int]] = []  # (op, argument count, values so far, depth)
        depth = 1
        while True:
            if depth < max_depth and draw() <= VALUE_P:
                op = OPERATORS[int(draw() * 4)]
                stack.append((op, 2 + int(draw() * n_counts), [], depth))
                tokens.append(op)
                depth += 1
                continue
            value = int(draw() * 10)
            tokens.append(DIGITS[value])
            while True:  # hand the value up, closing every operator that has all its arguments
                if not stack:
                    return (tokens, value) if len(tokens) <= max_len else None
                op, count, values, op_depth = stack[-1]
                values.append(value)
                if len(values) < count:
                    depth = op_depth + 1
                    break
                stack.pop()
                tokens.append(CLOSE)
                value = int(np.median(values)) if op == MED else min(values) if op == MIN else max(values) if op == MAX else sum(values) % 10
            if len(tokens) + len(stack) > max_len:  # every open operator still needs its ']'
                return None

    return sample


def _generate(n: int, rng: np.random.Generator, max_depth: int, max_args: int, min_len: int, max_len: int,
              keep_close: bool, exclude: Collection[str], max_attempts: int | None) -> ListOpsData:
    sample = _sampler(rng, max_depth, max_args, max_len)
    seen: set[str] = set()
    texts: list[str] = []
    labels: list[int] = []
    budget = max_attempts if max_attempts is not None else 10_000 * n + 100_000
    attempts = 0
    while len(texts) < n:
        attempts += 1
        if attempts > budget:
            raise ValueError(f"max_attempts={budget} tree draws gave only {len(texts)} of n={n} unique trees with "
                             f"{min_len} <= length <= {max_len}; widen min_len/max_len or raise max_depth/max_args")
        drawn = sample()
        if drawn is None or len(drawn[0]) < min_len:
            continue
        text = " ".join(drawn[0])
        if text in seen or text in exclude:
            continue
        seen.add(text)
        texts.append(text)
        labels.append(drawn[1])
    inputs = torch.full((n, max_len), PAD_ID, dtype=torch.int64)
    lengths = torch.zeros(n, dtype=torch.int64)
    for i, text in enumerate(texts):
        ids = encode(tokenize(text, keep_close))
        inputs[i, : len(ids)] = ids
        lengths[i] = len(ids)
    return ListOpsData(inputs=inputs, labels=torch.tensor(labels, dtype=torch.int64), lengths=lengths, texts=texts)


def make_listops(n: int, seed: int, max_depth: int = 10, max_args: int = 10, min_len: int = 500,
                 max_len: int = 2000, keep_close: bool = True, exclude: Collection[str] = (),
                 max_attempts: int | None = None) -> ListOpsData:
    """n unique ListOps trees with min_len <= tokens <= max_len, none of them in `exclude` (texts).

    Defaults are LRA's setting. Inputs are padded to max_len. `keep_close=False` drops `]` from the
    inputs as LRA's pipeline does (see the module docstring). A pure function of its arguments;
    raises ValueError when `max_attempts` draws (default 10,000 n + 100,000) do not give n trees."""
    check_listops_args(n, seed, max_depth, max_args, min_len, max_len)
    return _generate(n, np.random.default_rng(seed), max_depth, max_args, min_len, max_len, keep_close,
                     exclude, max_attempts)


def make_listops_splits(n_train: int, n_val: int, n_test: int, seed: int, max_depth: int = 10, max_args: int = 10,
                        min_len: int = 500, max_len: int = 2000, keep_close: bool = True,
                        max_attempts: int | None = None) -> dict[str, ListOpsData]:
    """Train, val and test splits with no tree in two of them (LRA: 96k/2k/2k).

    Each split draws from its own seed derived from `seed`; test is made first, then val excluding
    test, then train excluding both, so test depends only on (seed, n_test, tree settings)."""
    for name, size in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if size < 0:
            raise ValueError(f"{name} must be >= 0, got {name}={size}")
    check_listops_args(0, seed, max_depth, max_args, min_len, max_len)
    out: dict[str, ListOpsData] = {}
    taken: set[str] = set()
    for name, size in (("test", n_test), ("val", n_val), ("train", n_train)):
        rng = np.random.default_rng([seed, SPLIT_SALTS[name]])
        out[name] = _generate(size, rng, max_depth, max_args, min_len, max_len, keep_close, taken, max_attempts)
        taken.update(out[name].texts)
    return {name: out[name] for name in ("train", "val", "test")}


def majority_rate(labels: torch.Tensor | Sequence[int]) -> float:
    """The accuracy of always predicting the most common label: the floor a model must beat."""
    values = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
    if not values:
        raise ValueError("majority_rate needs at least one label")
    return Counter(values).most_common(1)[0][1] / len(values)
