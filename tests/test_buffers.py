"""What XLA allocates for a step: no leaf-sized temporaries where the updates avoid them.

The updates spell values that a reduction reads so that the reduction computes them in its own
loop (``optim_zoo._fusion``). XLA merges identical expressions across leaves too; if two leaves of
one shape built the same scalar the same way, their reductions would share one broadcast of it,
written out as large as a leaf. A tree of two such leaves must then need no more temporary
memory than two trees of one.

State stored in bfloat16 is widened to float32 where it is read; a widened leaf that two
reductions (or a reduction and a loop) shared would be written out, in float32. Each reduction
reads the stored bytes instead (``_fusion.widened_for_reductions``), so a step with bfloat16
state needs no temporary as large as a leaf.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax
import pytest

import optim_zoo
from optim_zoo import _fusion

SHAPE = (256, 512)  # factored by every factored optimizer (both axes >= 128)
LEAF_BYTES = math.prod(SHAPE) * 4  # float32

CASES = {
    "factored_adan": lambda: optim_zoo.factored_adan(1e-3),
    "factored_adai_l2": lambda: optim_zoo.factored_adai(1e-3, weight_decay=1e-2),
    "apollo_stable": lambda: optim_zoo.apollo(1e-3, weight_decay=1e-2, weight_decay_type="stable"),
    "apollo_l2": lambda: optim_zoo.apollo(1e-3, weight_decay=1e-2, weight_decay_type="L2"),
}


BF16 = {"dtype_momentum": jnp.bfloat16, "dtype_second_moment": jnp.bfloat16}
NO_TEMPORARY_CASES = {
    "apollo": lambda **kw: optim_zoo.apollo(1e-3, **kw),
    "apollo_l2": lambda **kw: optim_zoo.apollo(
        1e-3, weight_decay=1e-2, weight_decay_type="L2", **kw
    ),
    "apollo_decoupled": lambda **kw: optim_zoo.apollo(1e-3, weight_decay=1e-2, **kw),
    "apollo_stable_belief": lambda **kw: optim_zoo.apollo(
        1e-3, rebound="belief", weight_decay=1e-2, weight_decay_type="stable", **kw
    ),
    "adai": lambda **kw: optim_zoo.adai(1e-3, weight_decay=1e-2, **kw),
    "adaiw": lambda **kw: optim_zoo.adaiw(1e-3, weight_decay=1e-2, **kw),
    "factored_adan": lambda **kw: optim_zoo.factored_adan(1e-3, **kw),
    "factored_adai": lambda **kw: optim_zoo.factored_adai(1e-3, weight_decay=1e-2, **kw),
}


def compiled_step(tx: optax.GradientTransformation, num_leaves: int) -> Any:
    """One compiled, donated step on `num_leaves` float32 leaves of SHAPE."""
    params = {f"w{i}": jax.ShapeDtypeStruct(SHAPE, jnp.float32) for i in range(num_leaves)}
    state = jax.eval_shape(tx.init, params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()


def temp_bytes(tx: optax.GradientTransformation, num_leaves: int) -> int:
    """Temporary bytes of one compiled, donated step on `num_leaves` float32 leaves of SHAPE."""
    analysis = compiled_step(tx, num_leaves).memory_analysis()
    if analysis is None:
        pytest.skip("this backend reports no memory analysis")
    return int(analysis.temp_size_in_bytes)


@pytest.mark.parametrize("name", sorted(CASES))
def test_leaves_of_one_shape_share_no_temporary(name):
    one, two = temp_bytes(CASES[name](), 1), temp_bytes(CASES[name](), 2)
    # Shared broadcasts would add whole leaves; a few KB of per-leaf scalars and vectors do not.
    assert two <= 2 * one + LEAF_BYTES // 8, (name, one, two)


STATES = {
    "float32": {},
    "bfloat16": BF16,
    "bfloat16_stochastic": {**BF16, "state_rounding": "stochastic"},
}


@pytest.mark.parametrize("state", sorted(STATES))
@pytest.mark.parametrize("name", sorted(NO_TEMPORARY_CASES))
def test_no_leaf_sized_temporary(name, state):
    tx = NO_TEMPORARY_CASES[name](**STATES[state])
    # Two leaves of one shape: a value written out would take LEAF_BYTES for each.
    assert temp_bytes(tx, 2) < LEAF_BYTES // 8, (name, state)


# Bytes XLA's cost model counts for one step on one leaf, in float32 leaves, at most: one kernel
# per output array, each reading what it needs. Apollo with bfloat16 state (every state array
# at half the bytes): three sums (d; g, m, d; B, d) 3, m (g, m) 2, B (B, d) 1.5, the stored
# direction (m, B) 1.5, p (p, m, B) 3.5, 11.5 in all. The new m waits for the sums (scalars),
# not for the direction, so it is computed in place once; before, it was written out and
# copied once the direction had read it (13).
@pytest.mark.parametrize("state", ["bfloat16", "bfloat16_stochastic"])
def test_bfloat16_apollo_writes_m_once(state):
    cost = compiled_step(optim_zoo.apollo(1e-3, **STATES[state]), 1).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    if not cost or "bytes accessed" not in cost:
        pytest.skip("this backend reports no cost analysis")
    assert cost["bytes accessed"] <= 11.5 * LEAF_BYTES * 1.01, (state, cost["bytes accessed"])


@pytest.mark.parametrize("state", sorted(STATES))
def test_ordering_adds_no_kernel(state):
    # Adan on one leaf: one loop per output (m, v, n, prev_grad, p) and nothing else as large
    # as the leaf or drawn from it: prev_grad's wait for v and n reads them inside its own loop.
    # (Reading one element of each instead, XLA widened a bfloat16 array to slice it, in a
    # kernel of its own per array: 7 kernels, launch time on trees of many small leaves.)
    text = compiled_step(optim_zoo.adan(1e-3, **STATES[state]), 1).as_text()
    entry = text[text.index("\nENTRY") :]
    kernels = re.findall(r"= (\w+)\[([\d,]*)\][^=]* fusion\(", entry)
    # (The stochastic rounding's per-step bits are a uint32 kernel of their own.)
    assert len([s for dtype, s in kernels if s and dtype in ("f32", "bf16")]) == 5, kernels


# 8-bit state: a coded field's scales are the largest magnitude of each block of its new value;
# the reduction computes that value in its own loop (``_fusion.finite_block_max``) in two
# stages, the first keeping the maximum of each 8 elements: an eighth of a float32 leaf per coded
# field. Adan codes four fields; before, its step wrote each new value out whole (~6 leaves).
EIGHT_BIT = {"dtype_momentum": jnp.int8, "dtype_second_moment": jnp.uint8}


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_8bit_adan_keeps_only_the_blocks_maxima(rounding):
    tx = optim_zoo.adan(1e-3, weight_decay=1e-2, **EIGHT_BIT, state_rounding=rounding)
    coded_fields, leaves = 4, 2
    assert temp_bytes(tx, leaves) <= 1.2 * coded_fields * leaves * LEAF_BYTES / 8, rounding


# Adai's global mean and Apollo's per-tensor sums read 8-bit codes: each sum decodes them in its
# own loop (``_fusion.coded_sum``; Apollo's reads of a field behind ``apart``). Before, every
# decoded field a sum read was written out as large as the leaf: Adai 2.3 leaves of temporaries
# for its two leaves, Apollo 6.0. Apollo still writes one leaf-sized value per leaf.
@pytest.mark.parametrize(
    "name,coded_fields,leaf_sized",
    [("adai", 2, 0), ("adaiw", 2, 0), ("apollo", 3, 1), ("apollo_l2", 3, 1)],
)
def test_8bit_sums_decode_in_their_own_loops(name, coded_fields, leaf_sized):
    tx = NO_TEMPORARY_CASES[name](**EIGHT_BIT)
    leaves = 2
    bound = leaves * LEAF_BYTES * (leaf_sized + 1.2 * coded_fields / 8)
    assert temp_bytes(tx, leaves) <= bound, name


# The leaves' loops are independent, and XLA:CPU ran every leaf's reductions first: their
# temporaries (the blocks' maxima; Apollo's and CAME's decoded values) all lived at once, a
# step's growing with the number of leaves (Adan: 0.58 leaves of temporaries for one leaf,
# 3.39 for six). In turns (``_fusion.InTurns``, here one leaf a turn), each turn's temporaries
# are gone before the next one's begin: a few KB of scales a leaf more. CAME takes no turns
# (they cost it time for no memory on the 30M tree): its temporaries grow by 0.06 leaves a leaf
# (0.04 in turns).
EIGHT_BIT_CASES = {
    "adan": (lambda: optim_zoo.adan(1e-3, weight_decay=1e-2, **EIGHT_BIT), 0.05),
    "adafactor": (lambda: optim_zoo.adafactor(1e-3, momentum=0.9, **EIGHT_BIT), 0.05),
    "apollo": (lambda: optim_zoo.apollo(1e-3, **EIGHT_BIT), 0.05),
    "adai": (lambda: optim_zoo.adai(1e-3, **EIGHT_BIT), 0.05),
    "came": (lambda: optim_zoo.came(1e-3, **EIGHT_BIT), 0.07),
}


@pytest.mark.parametrize("name", sorted(EIGHT_BIT_CASES))
def test_8bit_temporaries_do_not_grow_with_the_leaves(name, monkeypatch):
    monkeypatch.setattr(_fusion, "TURN_ELEMENTS", math.prod(SHAPE))
    make, per_leaf = EIGHT_BIT_CASES[name]
    two, eight = temp_bytes(make(), 2), temp_bytes(make(), 8)
    assert eight <= two + LEAF_BYTES * per_leaf * 6, (
        name,
        two / LEAF_BYTES,
        eight / LEAF_BYTES,
    )


# A factored statistic's two means that read 8-bit codes each decode them in their own loop
# (``_fusion.coded_mean_squares``), keeping an eighth of the leaf apiece: CAME's instability
# ``u - m`` reads its new momentum, factored Adan's Nesterov gradient its previous gradient.
# Before, the decoded field (and CAME's instability) was written out as large as the leaf: for
# two leaves, CAME 3.0 leaves of temporaries (1.0 with float32 state, the clipped update its
# first stage hands on), factored Adan 2.6 (0.01).
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize(
    "make,coded_fields",
    [(optim_zoo.came, 1), (optim_zoo.factored_adan, 3)],
    ids=["came", "factored_adan"],
)
def test_8bit_means_decode_in_their_own_loops(make, coded_fields, rounding):
    leaves, eighths = 2, coded_fields + 2  # the blocks' maxima, and the two means' partial sums
    f32 = temp_bytes(make(1e-3), leaves)
    tx = make(1e-3, **EIGHT_BIT, state_rounding=rounding)
    assert temp_bytes(tx, leaves) <= f32 + 1.2 * eighths * leaves * LEAF_BYTES / 8, rounding
