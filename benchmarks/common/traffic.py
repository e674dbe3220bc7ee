"""Bytes: what an optimizer's state holds, and what one update moves through memory.

- `tree_bytes`: the bytes of a tree's arrays (real ones, or `jax.eval_shape`'s shapes).
- `find_states` and `second_moment_floats`: the optim_zoo primitive states inside an optimizer
  state, and the floats a factored second moment keeps per parameter leaf.
- `traffic`: the bytes an update moves, read p, g and the state once and write p and the state
  once (the single pass), plus the re-reads that each algorithm's reductions force
  (`ALGORITHMS`; docs/performance.md derives them), with the state counted at the dtypes it
  is allocated in (`state_itemsizes`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

import optim_zoo

# --- What a state holds -----------------------------------------------------------------------


def tree_bytes(tree: Any) -> int:
    """Bytes of the tree's arrays; works on arrays and on shape-and-dtype structs alike."""
    return sum(int(math.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def find_states(state: Any, kinds: type | tuple[type, ...]) -> list[Any]:
    """Every state of the types `kinds` inside an optimizer state, in tree order."""
    nodes = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kinds))
    return [node for node in nodes if isinstance(node, kinds)]


def second_moment_floats(statistics: Any, index: int) -> int:
    """Floats a factored second moment (`v_row`, `v_col`, `v`) keeps for leaf `index`.

    A factored leaf keeps a row and a column, any other leaf the full array.
    """
    fields = (statistics.v_row, statistics.v_col, statistics.v)
    return sum(int(math.prod(f[index].shape)) for f in fields if f[index] is not None)


# --- What an update moves ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StateItemsizes:
    """Bytes per element of the full-size state arrays that forced re-reads touch, by role.

    `momentum`: first-moment-like state (Adan's m, v and previous gradient; Apollo's m and
    direction; Adai's m). `second_moment`: Adan's n, Adafactor's unfactored statistics,
    Apollo's Hessian estimate, Adai's v. Read from the state a run allocated
    (`state_itemsizes`), so that a bfloat16 state is counted at 2 bytes, and 8-bit codes at
    their byte and their share of the block's scale (1 + 4 / 64 bytes for float32 scales).
    """

    momentum: float
    second_moment: float

    @classmethod
    def default(cls, itemsize: int) -> StateItemsizes:
        """The optimizers' defaults: momentum in the parameter dtype, statistics >= float32."""
        return cls(momentum=itemsize, second_moment=max(itemsize, 4))


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """One algorithm; `extra_reads(shape, itemsize, state)` counts the bytes that passes forced
    by its reductions re-read, for one parameter leaf, on top of a single pass. `itemsize` is
    the parameter's (and gradient's); `state` the state's (`StateItemsizes`; None: defaults)."""

    name: str
    passes: str
    reads: Callable[[tuple[int, ...], int, StateItemsizes], int]

    def extra_reads(
        self, shape: tuple[int, ...], itemsize: int, state: StateItemsizes | None = None
    ) -> int:
        return round(self.reads(shape, itemsize, state or StateItemsizes.default(itemsize)))


# Every factored optimizer the step-time benchmark runs uses this threshold, the default.
MIN_DIM_SIZE_TO_FACTOR = 128


def is_factored(shape: tuple[int, ...]) -> bool:
    """Whether a leaf of this shape keeps a factored second moment."""
    dims = optim_zoo.factored_dims(
        shape, factored=True, min_dim_size_to_factor=MIN_DIM_SIZE_TO_FACTOR
    )
    return dims is not None


def _no_extra(shape: tuple[int, ...], itemsize: int, state: StateItemsizes) -> int:
    return 0


def _adafactor_extra(shape: tuple[int, ...], itemsize: int, state: StateItemsizes) -> int:
    size = int(np.prod(shape))
    if is_factored(shape):
        # Pass 1 reads g and p (row and column means, rms(p)); pass 2 reads g (rms of the
        # update, which needs the new statistics); pass 3 reads g and p and writes p.
        return size * (2 * itemsize + itemsize)
    # Unfactored: pass 1 reads g, v, p (new v, rms of the update, rms(p)); pass 2 applies.
    return size * (itemsize + state.second_moment + itemsize)


def _apollo_extra(shape: tuple[int, ...], itemsize: int, state: StateItemsizes) -> int:
    # Pass 1 reads g, m, d, B for the three per-tensor sums (sum d^4, sum (g - m) d,
    # sum B d^2); pass 2 reads them again with p and writes m, B, d, p. (The benchmark runs
    # Apollo without decay; `DECAY_READS` has what the decays add.)
    size = int(np.prod(shape))
    return size * (itemsize + 2 * state.momentum + state.second_moment)


def _adai_extra(shape: tuple[int, ...], itemsize: int, state: StateItemsizes) -> int:
    # The global mean of the new v must be complete before any direction: pass 1 reads g, v
    # (and p, for L2 decay, which enters g); pass 2 reads them again and writes everything.
    size = int(np.prod(shape))
    return size * (2 * itemsize + state.second_moment)


def _adaiw_extra(shape: tuple[int, ...], itemsize: int, state: StateItemsizes) -> int:
    size = int(np.prod(shape))
    return size * (itemsize + state.second_moment)  # Decoupled decay: g and v only.


def _factored_adan_extra(shape: tuple[int, ...], itemsize: int, state: StateItemsizes) -> int:
    if not is_factored(shape):
        return 0  # A full n: Adan, one pass.
    # The direction needs the new row and column means of (g + b2 (g - prev))^2: pass 1 reads
    # g and prev. Pass 2 needs the new m and v besides p. Either pass 1 writes them (and prev)
    # and pass 2 re-reads m and v, or pass 2 computes them from the old m and v and re-reads
    # g, with prev too when v is left to pass 2. The fewest bytes: one momentum array, plus
    # another momentum array or g, whichever is smaller.
    size = int(np.prod(shape))
    return size * (state.momentum + min(state.momentum, itemsize))


def _factored_adai_extra(shape: tuple[int, ...], itemsize: int, state: StateItemsizes) -> int:
    if not is_factored(shape):
        return _adai_extra(shape, itemsize, state)
    # Pass 1 (over the whole tree, for the global mean) reads g and p (L2 decay enters g) for
    # the row and column means; nothing elementwise can be written before the mean. Pass 2
    # reads g and p again with m and the product of the betas, and writes m, the product, p.
    size = int(np.prod(shape))
    return size * 2 * itemsize


def _factored_adaiw_extra(shape: tuple[int, ...], itemsize: int, state: StateItemsizes) -> int:
    if not is_factored(shape):
        return _adaiw_extra(shape, itemsize, state)
    return int(np.prod(shape)) * itemsize  # Decoupled decay: pass 1 reads g only.


def _came_extra(shape: tuple[int, ...], itemsize: int, state: StateItemsizes) -> int:
    size = int(np.prod(shape))
    if len(shape) < 2:
        # A full second moment: pass 1 reads g and v (the new v, then the update's rms); pass 2
        # reads them again with m and p.
        return size * (itemsize + state.second_moment)
    # Factored over the last two axes, three reductions in a row: pass 1 reads g (row and
    # column means of g^2); pass 2 reads g (the rms of the update, which needs the new
    # statistics); pass 3 reads g and m and writes m (row and column means of (u - m)^2);
    # pass 4 reads the new m and p and writes p.
    return size * (2 * itemsize + state.momentum)


ALGORITHMS: dict[str, Algorithm] = {
    "AdamW": Algorithm("AdamW", "1 (elementwise)", _no_extra),
    "Adan": Algorithm("Adan", "1 (elementwise)", _no_extra),
    "Factored Adan": Algorithm(
        "Factored Adan", "2 (row and column means; factored leaves)", _factored_adan_extra
    ),
    "Adafactor": Algorithm("Adafactor", "3 over g, 2 over p (factored leaves)", _adafactor_extra),
    "Apollo": Algorithm("Apollo", "2 per tensor", _apollo_extra),
    "Adai": Algorithm("Adai", "2 (global mean)", _adai_extra),
    "Factored Adai": Algorithm("Factored Adai", "2 (global mean)", _factored_adai_extra),
    "AdaiW": Algorithm("AdaiW", "2 (global mean)", _adaiw_extra),
    "Factored AdaiW": Algorithm("Factored AdaiW", "2 (global mean)", _factored_adaiw_extra),
    "CAME": Algorithm("CAME", "4 over g and m (matrices)", _came_extra),
}


# What a weight decay other than the row's own adds to (or takes from) the forced re-reads, by
# (algorithm, decay): per element of a leaf, from the parameter and state itemsizes. Decoupled
# decay reads p where the single pass reads it anyway, so it adds nothing anywhere.
DECAY_READS: dict[tuple[str, str], Callable[[int, StateItemsizes], float]] = {
    # L2: the secant sum reads g + wd * p, so pass 1 reads p too.
    ("Apollo", "L2"): lambda itemsize, state: itemsize,
    # Stable: the mean of the new curvature needs B's update (which needs the sums): a pass
    # over B and d between the sums and the direction.
    ("Apollo", "stable"): lambda itemsize, state: state.second_moment + state.momentum,
    # Adai's own decay is L2: without it, pass 1 does not read p.
    ("Adai", "none"): lambda itemsize, state: -itemsize,
    ("Factored Adai", "none"): lambda itemsize, state: -itemsize,
}


# Which fields of each optim_zoo primitive's state hold which role (`StateItemsizes`).
STATE_ROLES: dict[type, dict[str, tuple[str, ...]]] = {
    optim_zoo.ScaleByNesterovMomentState: {
        "momentum": ("m", "v", "prev_grad"),
        "second_moment": ("n",),
    },
    optim_zoo.ScaleByAdaptiveInertiaState: {"momentum": ("m",), "second_moment": ("v",)},
    optim_zoo.ScaleByRectifiedDiagHessianState: {
        "momentum": ("m", "direction"),
        "second_moment": ("hessian_diag",),
    },
    optim_zoo.ScaleByFactoredRmsState: {"second_moment": ("v_row", "v_col", "v")},
    optim_zoo.ScaleByConfidenceState: {"momentum": ("m",), "second_moment": ("instability",)},
    optax.EmaState: {"momentum": ("ema",)},  # Adafactor's momentum, when it is on.
}


def state_itemsizes(state: Any, itemsize: int) -> StateItemsizes:
    """The bytes per element of each state role, read from the allocated state leaves.

    Each role's bytes over its elements: its itemsize where every leaf has one dtype, and with
    8-bit codes (`optim_zoo.CodedState`) the codes and scales of the large leaves weighed with
    the small leaves left uncoded. A role the state does not hold (a peer's state, or
    Adafactor's momentum when it is off) keeps the default, which no re-read then touches.
    """
    nbytes: dict[str, float] = {}
    elements: dict[str, int] = {}
    coded = lambda x: isinstance(x, optim_zoo.CodedState)  # noqa: E731
    for primitive in find_states(state, tuple(STATE_ROLES)):
        for role, fields in STATE_ROLES[type(primitive)].items():
            for field in fields:
                for leaf in jax.tree.leaves(getattr(primitive, field), is_leaf=coded):
                    arrays = leaf if coded(leaf) else (leaf,)
                    nbytes[role] = nbytes.get(role, 0) + sum(a.nbytes for a in arrays)
                    elements[role] = elements.get(role, 0) + math.prod(leaf.shape)
    default = StateItemsizes.default(itemsize)
    found = {role: nbytes[role] / elements[role] for role in nbytes if elements[role]}
    return StateItemsizes(
        momentum=found.get("momentum", default.momentum),
        second_moment=found.get("second_moment", default.second_moment),
    )


def single_pass_bytes(param_bytes: int, state_bytes: int) -> int:
    """Bytes one pass moves: read p, g and the state, write p and the state."""
    return 3 * param_bytes + 2 * state_bytes


def traffic(
    shapes: list[tuple[int, ...]],
    itemsize: int,
    state_bytes: int,
    algorithm: Algorithm,
    state: StateItemsizes | None = None,
    decay: str | None = None,
) -> dict:
    """Bytes a single pass moves (read p, g, state; write p, state) and the forced extra reads.

    `shapes` are the parameter leaves' shapes; `state_bytes` is the allocated state's; `state`
    the itemsizes of its roles (None: the defaults), so that a bfloat16 state's single pass and
    re-reads count 2 bytes an element; `decay` a weight decay other than the row's own
    (``"none"``, ``"L2"``, ``"decoupled"``, ``"stable"``; `DECAY_READS`).
    """
    param_bytes = sum(int(np.prod(s)) for s in shapes) * itemsize
    single = single_pass_bytes(param_bytes, state_bytes)
    extra = sum(algorithm.extra_reads(s, itemsize, state) for s in shapes)
    per_element = DECAY_READS.get((algorithm.name, decay or ""))
    if per_element is not None:
        sizes = state or StateItemsizes.default(itemsize)
        extra += round(per_element(itemsize, sizes) * (param_bytes // itemsize))
    return {"param_bytes": param_bytes, "bytes_single": single, "bytes_min": single + extra}
