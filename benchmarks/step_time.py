"""Time per optimizer step of every optim_zoo optimizer and its peers, next to the memory floor.

An optimizer step reads every parameter, gradient and state leaf and writes back the parameters
and the state. Its floor on any device is those bytes over the memory bandwidth. This script
measures that bandwidth first (a jitted, donated in-place update of one large buffer), then times
one jitted, donated ``update`` + ``apply_updates`` step of each JAX optimizer and one
``optimizer.step()`` of each PyTorch peer, on three trees. Each row is timed in two rounds over
all rows of its tree (median of repeated runs after warm-up in each round; the row keeps its
better round), so that load elsewhere on the machine does not single out one row. The trees:

* ``30M``: a transformer-shaped tree of 29.4M parameters (d_model 512, 8 layers, vocab 8192);
* ``5M``: a transformer-shaped tree of 5.8M parameters (d_model 256, 6 layers, vocab 4096);
* ``1000x1k``: 1,000 leaves of 1,000 parameters each (per-leaf overhead).

Per row it reports ms per step, the bytes a single pass moves, the single-pass floor, the floor
of the fewest passes the algorithm's reductions force (``ALGORITHMS``; docs/performance.md
derives them), time over floor, optimizer state bytes per parameter byte, compile time and, for
JAX rows, what XLA made of the step (fused kernels per leaf, temporary buffer bytes).

Besides the published algorithms (each with its peers in optax and PyTorch), the same run times
optim_zoo's own combinations with a factored second moment, ``factored_adan`` and
``factored_adai`` (``Factored AdaiW``: ``decoupled=True``), at the hyperparameters of Adan,
Adai and AdaiW, and every optim_zoo optimizer again with its state in bfloat16
(``optim_zoo [bf16 state]``: ``dtype_momentum`` and ``dtype_second_moment`` bfloat16, float32
parameters). Their bytes come from the state they allocate. They have no peers and no targets.

    python benchmarks/step_time.py              # full run, about 13 minutes on 2 CPU cores
    python benchmarks/step_time.py --quick      # smoke run, about half a minute (the tests')
    python benchmarks/step_time.py --no-torch   # JAX rows only
    python benchmarks/step_time.py --only adan  # rows whose algorithm (or a word of it), library
                                                # or variant matches: adan, factored, bf16, optax

PyTorch peers (``pip install -e '.[torch]'``, plus ``pip install --no-deps timm==1.0.31``) are
optional: a peer that cannot be imported is recorded with the reason and skipped. Results go to
``benchmarks/results/step_time.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import importlib.util
import json
import os
import platform
import re
import statistics
import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optim_zoo

DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results"
MB = 1e6

# --- Trees -------------------------------------------------------------------------------------


def transformer_shapes(d_model: int, layers: int, vocab: int, ff_mult: int = 4) -> dict:
    """Leaf shapes of a pre-LayerNorm transformer: embedding, then per layer attention and MLP."""
    ff = ff_mult * d_model

    def dense(n_in, n_out):
        return {"w": (n_in, n_out), "b": (n_out,)}

    def norm():
        return {"scale": (d_model,), "bias": (d_model,)}

    tree: dict[str, Any] = {"embed": (vocab, d_model), "final_norm": norm()}
    for i in range(layers):
        tree[f"layer_{i}"] = {
            "attn_norm": norm(),
            "qkv": dense(d_model, 3 * d_model),
            "attn_out": dense(d_model, d_model),
            "mlp_norm": norm(),
            "mlp_in": dense(d_model, ff),
            "mlp_out": dense(ff, d_model),
        }
    return tree


def many_leaves_shapes(num_leaves: int, leaf_size: int) -> dict:
    return {f"leaf_{i:04d}": (leaf_size,) for i in range(num_leaves)}


TREES: dict[str, Callable[[], dict]] = {
    "30M": lambda: transformer_shapes(512, 8, 8192),
    "5M": lambda: transformer_shapes(256, 6, 4096),
    "1000x1k": lambda: many_leaves_shapes(1000, 1000),
}
QUICK_TREES: dict[str, Callable[[], dict]] = {
    # A 128 x 128 head: the one factored leaf (MIN_DIM_SIZE_TO_FACTOR), still small enough
    # that PyTorch keeps every tensor op on one thread.
    "tiny": lambda: {**transformer_shapes(32, 1, 64), "head": (128, 128)},
    "10x100": lambda: many_leaves_shapes(10, 100),
}
HEADLINE_TREE = "30M"
MANY_LEAVES_TREE = "1000x1k"


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple)


def leaf_shapes(shapes: dict) -> list[tuple[int, ...]]:
    return jax.tree.leaves(shapes, is_leaf=_is_shape)


def make_arrays(shapes: dict, dtype: Any, seed: int = 0) -> tuple[Any, Any]:
    """Parameters ~ N(0, 0.02^2) and gradients ~ N(0, 1e-3^2), as NumPy trees."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
    params = [(0.02 * rng.standard_normal(s, np.float32)).astype(dtype) for s in leaves]
    grads = [(1e-3 * rng.standard_normal(s, np.float32)).astype(dtype) for s in leaves]
    return treedef.unflatten(params), treedef.unflatten(grads)


# --- Algorithms: hyperparameters and the passes their reductions force -------------------------


@dataclasses.dataclass(frozen=True)
class StateItemsizes:
    """Bytes per element of the full-size state arrays that forced re-reads touch, by role.

    `momentum`: first-moment-like state (Adan's m, v and previous gradient; Apollo's m and
    direction; Adai's m). `second_moment`: Adan's n, Adafactor's unfactored statistics,
    Apollo's Hessian estimate, Adai's v. Read from the state a run allocated
    (`state_itemsizes`), so that a bfloat16 state is counted at 2 bytes.
    """

    momentum: int
    second_moment: int

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
        return self.reads(shape, itemsize, state or StateItemsizes.default(itemsize))


# Every factored optimizer in the benchmark runs with its default threshold.
MIN_DIM_SIZE_TO_FACTOR = 128


def _is_factored(shape: tuple[int, ...]) -> bool:
    return optim_zoo.factored_dims(shape, True, MIN_DIM_SIZE_TO_FACTOR) is not None


def _no_extra(shape: tuple[int, ...], itemsize: int, state: StateItemsizes) -> int:
    return 0


def _adafactor_extra(shape: tuple[int, ...], itemsize: int, state: StateItemsizes) -> int:
    size = int(np.prod(shape))
    if _is_factored(shape):
        # Pass 1 reads g and p (row and column means, rms(p)); pass 2 reads g (rms of the
        # update, which needs the new statistics); pass 3 reads g and p and writes p.
        return size * (2 * itemsize + itemsize)
    # Unfactored: pass 1 reads g, v, p (new v, rms of the update, rms(p)); pass 2 applies.
    return size * (itemsize + state.second_moment + itemsize)


def _apollo_extra(shape: tuple[int, ...], itemsize: int, state: StateItemsizes) -> int:
    # Pass 1 reads g, m, d, B for the three per-tensor sums (sum d^4, sum (g - m) d,
    # sum B d^2); pass 2 reads them again with p and writes m, B, d, p. (L2 decay with a
    # nonzero rate would also read p in pass 1; the benchmark runs the default, no decay.)
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
    if not _is_factored(shape):
        return 0  # A full n: Adan, one pass.
    # The direction needs the new row and column means of (g + b2 (g - prev))^2: pass 1 reads
    # g and prev. Pass 2 needs the new m and v besides p. Either pass 1 writes them (and prev)
    # and pass 2 re-reads m and v, or pass 2 computes them from the old m and v and re-reads
    # g, with prev too when v is left to pass 2. The fewest bytes: one momentum array, plus
    # another momentum array or g, whichever is smaller.
    size = int(np.prod(shape))
    return size * (state.momentum + min(state.momentum, itemsize))


def _factored_adai_extra(shape: tuple[int, ...], itemsize: int, state: StateItemsizes) -> int:
    if not _is_factored(shape):
        return _adai_extra(shape, itemsize, state)
    # Pass 1 (over the whole tree, for the global mean) reads g and p (L2 decay enters g) for
    # the row and column means; nothing elementwise can be written before the mean. Pass 2
    # reads g and p again with m and the product of the betas, and writes m, the product, p.
    size = int(np.prod(shape))
    return size * 2 * itemsize


def _factored_adaiw_extra(shape: tuple[int, ...], itemsize: int, state: StateItemsizes) -> int:
    if not _is_factored(shape):
        return _adaiw_extra(shape, itemsize, state)
    return int(np.prod(shape)) * itemsize  # Decoupled decay: pass 1 reads g only.


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
}
# The published algorithms, which have peers and targets; the factored ones are optim_zoo's own
# combinations, timed for their cost only.
PUBLISHED = ("AdamW", "Adan", "Adafactor", "Apollo", "Adai", "AdaiW")

# Shared hyperparameters, one setting per algorithm for every implementation.
ADAN_HP = {"lr": 1e-3, "betas": (0.98, 0.92, 0.99), "eps": 1e-8, "weight_decay": 0.02}
ADAMW_HP = {"lr": 1e-3, "weight_decay": 1e-4}
APOLLO_HP = {"lr": 1e-2, "init_lr": 1e-5, "warmup": 500, "beta": 0.9, "eps": 1e-4}
ADAI_HP = {"lr": 0.1, "beta0": 0.1, "beta2": 0.99, "eps": 1e-3, "weight_decay": 5e-4}


# --- Contenders --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Contender:
    """One implementation of one algorithm.

    `make` returns an optax transformation (JAX) or, given the list of torch parameters, a torch
    optimizer. `module` is the import that a PyTorch peer needs; a failed import skips the row.
    `variant` names a non-default configuration of the same implementation (``bf16 state``);
    such rows have neither peers nor targets.
    """

    algorithm: str
    library: str
    make: Callable[..., Any]
    framework: str = "jax"
    module: str | None = None
    note: str = ""
    variant: str = ""

    @property
    def implementation(self) -> str:
        return self.library + (f" [{self.variant}]" if self.variant else "")

    @property
    def name(self) -> str:
        return f"{self.implementation} {self.algorithm}"

    def matches(self, wanted: set[str]) -> bool:
        """Whether any of `wanted` (lower case) names the algorithm, a word of it, the library
        or a word of the variant: ``adan`` selects Adan and Factored Adan, ``bf16`` the
        bfloat16-state rows."""
        names = {self.algorithm.lower(), self.library.lower(), *self.algorithm.lower().split()}
        return bool((names | set(self.variant.lower().split())) & wanted)


def _import_timm_optim(name: str) -> types.ModuleType:
    """Imports `timm.optim.<name>`, if need be without running `timm/__init__.py`.

    timm's package import pulls in torchvision, which has no build on PyPI that works with the
    CPU-only torch wheel; timm's optimizer modules need only torch. When the package import
    fails, they are loaded from the installed timm package directly.
    """
    try:
        return importlib.import_module(f"timm.optim.{name}")
    except Exception:
        for module_name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
            del sys.modules[module_name]
    spec = importlib.util.find_spec("timm")
    if spec is None or spec.origin is None:
        raise ImportError("timm is not installed")
    root = Path(spec.origin).parent
    for package, path in (("timm", root), ("timm.optim", root / "optim")):
        module = types.ModuleType(package)
        module.__path__ = [str(path)]
        sys.modules[package] = module
    return importlib.import_module(f"timm.optim.{name}")


def _torch_contenders() -> list[Contender]:
    def torch_adamw(params):
        import torch

        return torch.optim.AdamW(params, fused=True, **ADAMW_HP)

    def po(name):
        return lambda: getattr(importlib.import_module("pytorch_optimizer"), name)

    def po_adan(params):
        hp = dict(ADAN_HP)
        return po("Adan")()(params, **hp)

    def po_adafactor(params):
        # No momentum (betas[0] None), relative step and parameter scale, as optim_zoo's default.
        return po("AdaFactor")()(params, lr=None, betas=(None, 0.999), relative_step=True)

    def po_apollo(params):
        hp = APOLLO_HP
        return po("ApolloDQN")()(
            params,
            lr=hp["lr"],
            init_lr=hp["init_lr"],
            warmup_steps=hp["warmup"],
            beta=hp["beta"],
            eps=hp["eps"],
            rebound="constant",
        )

    def po_adai(decoupled):
        def make(params):
            hp = ADAI_HP
            return po("Adai")()(
                params,
                lr=hp["lr"],
                betas=(hp["beta0"], hp["beta2"]),
                eps=hp["eps"],
                weight_decay=hp["weight_decay"],
                weight_decouple=decoupled,
            )

        return make

    def timm_adan(params):
        return _import_timm_optim("adan").Adan(params, **ADAN_HP)

    def timm_adafactor(params):
        return _import_timm_optim("adafactor").Adafactor(
            params, lr=None, betas=None, min_dim_size_to_factor=128
        )

    torch_rows = [
        ("AdamW", "torch", torch_adamw, "torch", "fused=True"),
        ("Adan", "pytorch-optimizer", po_adan, "pytorch_optimizer", ""),
        ("Adafactor", "pytorch-optimizer", po_adafactor, "pytorch_optimizer", "factors all 2D"),
        ("Apollo", "pytorch-optimizer", po_apollo, "pytorch_optimizer", "ApolloDQN"),
        ("Adai", "pytorch-optimizer", po_adai(False), "pytorch_optimizer", ""),
        ("AdaiW", "pytorch-optimizer", po_adai(True), "pytorch_optimizer", ""),
        ("Adan", "timm", timm_adan, "timm.optim.adan", ""),
        ("Adafactor", "timm", timm_adafactor, "timm.optim.adafactor", ""),
    ]
    return [
        Contender(alg, lib, make, framework="torch", module=module, note=note)
        for alg, lib, make, module, note in torch_rows
    ]


BF16_STATE = "bf16 state"


def _optim_zoo_contenders() -> list[Contender]:
    """Every optim_zoo optimizer at the shared hyperparameters, each followed by its
    bfloat16-state variant (float32 parameters: the math runs in float32 either way)."""
    hp = ADAN_HP
    b1, b2, b3 = hp["betas"]
    adan_kwargs = {"b1": b1, "b2": b2, "b3": b3, "eps": hp["eps"], **_wd(hp)}
    ap = APOLLO_HP
    ai = ADAI_HP
    adai_kwargs = {"beta0": ai["beta0"], "beta2": ai["beta2"], "eps": ai["eps"], **_wd(ai)}
    factored = {"min_dim_size_to_factor": MIN_DIM_SIZE_TO_FACTOR}
    bf16 = {"dtype_momentum": jnp.bfloat16, "dtype_second_moment": jnp.bfloat16}
    # (algorithm, make(**dtypes), the dtype options of the variant, its note)
    optimizers: list[tuple[str, Callable[..., Any], dict, str]] = [
        ("Adan", lambda **kw: optim_zoo.adan(hp["lr"], **adan_kwargs, **kw), bf16, ""),
        (
            "Factored Adan",
            lambda **kw: optim_zoo.factored_adan(hp["lr"], **adan_kwargs, **factored, **kw),
            bf16,
            "",
        ),
        (
            "Adafactor",
            lambda **kw: optim_zoo.adafactor(**kw),
            {"dtype_second_moment": jnp.bfloat16},
            "no momentum here: statistics only",
        ),
        (
            "Apollo",
            lambda **kw: optim_zoo.apollo(
                ap["lr"], ap["beta"], ap["eps"], init_lr=ap["init_lr"], warmup=ap["warmup"], **kw
            ),
            bf16,
            "",
        ),
        ("Adai", lambda **kw: optim_zoo.adai(ai["lr"], **adai_kwargs, **kw), bf16, ""),
        (
            "Factored Adai",
            lambda **kw: optim_zoo.factored_adai(ai["lr"], **adai_kwargs, **factored, **kw),
            bf16,
            "",
        ),
        ("AdaiW", lambda **kw: optim_zoo.adaiw(ai["lr"], **adai_kwargs, **kw), bf16, ""),
        (
            "Factored AdaiW",
            lambda **kw: optim_zoo.factored_adai(
                ai["lr"], **adai_kwargs, decoupled=True, **factored, **kw
            ),
            bf16,
            "",
        ),
    ]
    rows = []
    for algorithm, make, dtypes, note in optimizers:
        rows.append(Contender(algorithm, "optim_zoo", make))
        rows.append(
            Contender(
                algorithm,
                "optim_zoo",
                lambda make=make, dtypes=dtypes: make(**dtypes),
                note=note,
                variant=BF16_STATE,
            )
        )
    return rows


def jax_contenders() -> list[Contender]:
    hp = ADAN_HP
    b1, b2, b3 = hp["betas"]
    adan_kwargs = {"b1": b1, "b2": b2, "b3": b3, "eps": hp["eps"]}
    rows = [
        Contender("AdamW", "optax", lambda: optax.adamw(ADAMW_HP["lr"], **_wd(ADAMW_HP))),
        Contender(
            "Adan",
            "optax",
            lambda: optax.adan(hp["lr"], weight_decay=hp["weight_decay"], **adan_kwargs),
            note="not the official algorithm",
        ),
        Contender("Adafactor", "optax", lambda: optax.adafactor()),
    ]
    return _optim_zoo_contenders() + rows


def _wd(hp: dict) -> dict:
    return {"weight_decay": hp["weight_decay"]}


def all_contenders(with_torch: bool) -> list[Contender]:
    rows = jax_contenders()
    if with_torch:
        rows += _torch_contenders()
    order = list(ALGORITHMS)
    # Stable: optim_zoo first, each optimizer followed by its variant, then the peers.
    return sorted(rows, key=lambda c: order.index(c.algorithm))


# --- Measurement -------------------------------------------------------------------------------


def _median_time(fn: Callable[[], Any], warmup: int, min_reps: int, budget_s: float) -> dict:
    """Runs `fn` `warmup` times, then at least `min_reps` times or until `budget_s` is spent."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "reps": len(times),
    }


def stream_bandwidth(num_elements: int, warmup: int, reps: int) -> float:
    """Bytes per second of a jitted, donated in-place update x <- a*x + b of a large buffer."""
    update = jax.jit(lambda x: x * 0.999 + 0.001, donate_argnums=0)
    box = [jnp.ones((num_elements,), jnp.float32)]

    def run():
        box[0] = update(box[0])
        box[0].block_until_ready()

    timing = _median_time(run, warmup, reps, 0.0)
    return 2 * box[0].nbytes / timing["median_s"]


def _hlo_stats(compiled: Any, num_leaves: int) -> dict:
    """Kernels per leaf (fusions and copies in the entry computation) and temporary bytes."""
    text = compiled.as_text()
    entry = text[text.index("\nENTRY") :]
    fusions = len(re.findall(r" fusion\(", entry))
    copies = len(re.findall(r" copy\(", entry))
    try:
        temp_bytes = int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # memory_analysis is best effort on some backends
        temp_bytes = None
    return {
        "fusions_per_leaf": fusions / num_leaves,
        "copies": copies,
        "temp_bytes": temp_bytes,
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
    optax.EmaState: {"momentum": ("ema",)},  # Adafactor's momentum, when it is on.
}


def state_itemsizes(state: Any, itemsize: int) -> StateItemsizes:
    """The itemsize of each state role, read from the dtypes of the allocated state leaves.

    Every tree here has one parameter dtype, so each role has one itemsize (the largest, were
    leaves to differ). A role the state does not hold (a peer's state, or Adafactor's momentum
    when it is off) keeps the default, which no re-read then touches.
    """
    kinds = tuple(STATE_ROLES)
    primitives = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kinds))
    found: dict[str, int] = {}
    for primitive in primitives:
        if not isinstance(primitive, kinds):
            continue
        for role, fields in STATE_ROLES[type(primitive)].items():
            for field in fields:
                for leaf in jax.tree.leaves(getattr(primitive, field)):
                    found[role] = max(found.get(role, 0), leaf.dtype.itemsize)
    default = StateItemsizes.default(itemsize)
    return StateItemsizes(
        momentum=found.get("momentum", default.momentum),
        second_moment=found.get("second_moment", default.second_moment),
    )


def prepare_jax(contender: Contender, params_np: Any, grads_np: Any) -> tuple[Callable, Callable]:
    """Compiles the donated step; returns `run` (one step) and `finish` (the row's facts)."""
    tx = contender.make()
    params = jax.tree.map(jnp.asarray, params_np)
    grads = jax.tree.map(jnp.asarray, grads_np)
    state = tx.init(params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
    compile_s = time.perf_counter() - t0
    hlo = _hlo_stats(compiled, len(jax.tree.leaves(params)))
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    itemsize = jax.tree.leaves(params)[0].dtype.itemsize
    itemsizes = dataclasses.asdict(state_itemsizes(state, itemsize))
    box = [params, state]

    def run():
        box[0], box[1] = compiled(box[0], box[1], grads)
        jax.block_until_ready(box)

    def finish():
        finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(box[0]))
        return {
            "compile_s": compile_s,
            "state_bytes": state_bytes,
            "state_itemsizes": itemsizes,
            "finite": finite,
            **hlo,
        }

    return run, finish


def prepare_torch(contender: Contender, params_np: Any, grads_np: Any) -> tuple[Callable, Callable]:
    """Builds the optimizer on float32 copies; returns `run` (one step) and `finish`."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    params = []
    for p, g in zip(jax.tree.leaves(params_np), jax.tree.leaves(grads_np), strict=True):
        tensor = torch.nn.Parameter(torch.from_numpy(np.array(p, np.float32)))
        tensor.grad = torch.from_numpy(np.array(g, np.float32))
        params.append(tensor)
    optimizer = contender.make(params)

    def run():
        with torch.no_grad():
            optimizer.step()

    def finish():
        state_bytes = sum(
            v.numel() * v.element_size()
            for state in optimizer.state.values()
            for v in state.values()
            if torch.is_tensor(v)
        )
        finite = all(bool(torch.isfinite(p).all()) for p in params)
        return {"compile_s": None, "state_bytes": state_bytes, "finite": finite}

    return run, finish


def import_error(contender: Contender) -> str | None:
    """None when the contender's framework and module import, else the reason they do not."""
    if contender.framework != "torch":
        return None
    try:
        importlib.import_module("torch")
        if contender.module and contender.module.startswith("timm.optim."):
            _import_timm_optim(contender.module.rsplit(".", 1)[1])
        elif contender.module:
            importlib.import_module(contender.module)
    except Exception as e:  # ImportError, or anything a broken install raises on import
        return f"{type(e).__name__}: {e}"
    return None


def traffic(
    shapes: dict,
    itemsize: int,
    state_bytes: int,
    algorithm: Algorithm,
    state: StateItemsizes | None = None,
) -> dict:
    """Bytes a single pass moves (read p, g, state; write p, state) and the forced extra reads.

    `state_bytes` is the allocated state's; `state` the itemsizes of its roles (None: the
    defaults), so that a bfloat16 state's single pass and re-reads count 2 bytes an element.
    """
    leaves = leaf_shapes(shapes)
    param_bytes = sum(int(np.prod(s)) for s in leaves) * itemsize
    single = 3 * param_bytes + 2 * state_bytes
    extra = sum(algorithm.extra_reads(s, itemsize, state) for s in leaves)
    return {"param_bytes": param_bytes, "bytes_single": single, "bytes_min": single + extra}


# --- Report ------------------------------------------------------------------------------------


def _implementation(row: dict) -> str:
    return row["library"] + (f" [{row['variant']}]" if row.get("variant") else "")


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_table(rows: list[dict], trees: Sequence[str]) -> str:
    header = (
        "| tree | algorithm | implementation | ms/step | MB moved (1 pass / min) "
        "| floor ms (1 pass / min) | time/floor (1 pass / min) | state B per param B "
        "| kernels/leaf | temp MB | compile s |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for tree in trees:
        for row in rows:
            if row["tree"] != tree:
                continue
            name = _implementation(row) + (f" ({row['note']})" if row.get("note") else "")
            if "skipped" in row:
                lines.append(
                    f"| {tree} | {row['algorithm']} | {name} | skipped: {row['skipped']} "
                    "| | | | | | | |"
                )
                continue
            temp = row.get("temp_bytes")
            lines.append(
                f"| {tree} | {row['algorithm']} | {name} | {row['ms_per_step']:.2f} "
                f"| {row['bytes_single'] / MB:.0f} / {row['bytes_min'] / MB:.0f} "
                f"| {row['floor_ms']:.2f} / {row['floor_min_ms']:.2f} "
                f"| {row['time_over_floor']:.2f} / {row['time_over_min_floor']:.2f} "
                f"| {row['state_per_param']:.2f} "
                f"| {_fmt(row.get('fusions_per_leaf'), '.1f')} "
                f"| {_fmt(None if temp is None else temp / MB, '.1f')} "
                f"| {_fmt(row.get('compile_s'), '.1f')} |"
            )
    return header + "\n".join(lines) + "\n"


def check_targets(rows: list[dict], headline: str, many_leaves: str) -> list[dict]:
    """The issue's targets, evaluated on this run's rows.

    Only the published algorithms' default configurations take part, as targets or as peers:
    the variant rows (bfloat16 state) and optim_zoo's factored combinations are not compared.
    """
    limits = {"Adan": 1.3, "Adafactor": 2.0, "Apollo": 2.0, "Adai": 2.0, "AdaiW": 2.0}
    timed = [
        r
        for r in rows
        if "skipped" not in r and not r.get("variant") and r["algorithm"] in PUBLISHED
    ]
    checks = []
    for algorithm, limit in limits.items():
        ours = [
            r
            for r in timed
            if r["tree"] == headline and r["library"] == "optim_zoo" and r["algorithm"] == algorithm
        ]
        for r in ours:
            checks.append(
                {
                    "target": f"{algorithm} time/floor <= {limit} ({headline})",
                    "value": round(r["time_over_floor"], 3),
                    "met": r["time_over_floor"] <= limit,
                }
            )
    for tree in sorted({r["tree"] for r in timed}):
        for r in timed:
            if r["tree"] != tree or r["library"] != "optim_zoo":
                continue
            peers = [
                p
                for p in timed
                if p["tree"] == tree and p["algorithm"] == r["algorithm"] and p is not r
            ]
            if not peers:
                continue
            fastest = min(peers, key=lambda p: p["ms_per_step"])
            checks.append(
                {
                    "target": f"{r['algorithm']} faster than every peer ({tree})",
                    "value": f"{r['ms_per_step']:.2f} ms vs {fastest['library']} "
                    f"{fastest['ms_per_step']:.2f} ms",
                    "met": r["ms_per_step"] < fastest["ms_per_step"],
                }
            )
    baseline = [
        r
        for r in timed
        if r["tree"] == many_leaves and r["library"] == "optax" and r["algorithm"] == "AdamW"
    ]
    if baseline:
        base = baseline[0]["overhead_us_per_leaf"]
        for r in timed:
            if r["tree"] == many_leaves and r["library"] == "optim_zoo":
                checks.append(
                    {
                        "target": f"{r['algorithm']} per-leaf overhead <= 2x optax.adamw's",
                        "value": f"{r['overhead_us_per_leaf']:.2f} us vs {base:.2f} us",
                        "met": r["overhead_us_per_leaf"] <= 2 * base,
                    }
                )
    return checks


def plot(rows: list[dict], trees: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    libraries = [
        "optim_zoo",
        f"optim_zoo [{BF16_STATE}]",
        "optax",
        "torch",
        "pytorch-optimizer",
        "timm",
    ]
    colors = dict(zip(libraries, ["C0", "C0", "C1", "C2", "C3", "C4"], strict=True))
    hatches = {f"optim_zoo [{BF16_STATE}]": "//"}
    trees = [t for t in trees if t != MANY_LEAVES_TREE] or list(trees)
    fig, axes = plt.subplots(1, len(trees), figsize=(8.5 * len(trees), 4.5), squeeze=False)
    for ax, tree in zip(axes[0], trees, strict=True):
        timed = [r for r in rows if r["tree"] == tree and "skipped" not in r]
        algorithms = [a for a in ALGORITHMS if any(r["algorithm"] == a for r in timed)]
        width = 0.8 / len(libraries)
        for i, algorithm in enumerate(algorithms):
            group = [r for r in timed if r["algorithm"] == algorithm]
            first = _implementation(group[0])
            floor = max(r["floor_ms"] for r in group if _implementation(r) == first)
            ax.hlines(floor, i - 0.4, i + 0.4, colors="k", linestyles="--", linewidth=1)
            for j, library in enumerate(libraries):
                for r in group:
                    if _implementation(r) == library:
                        ax.bar(
                            i - 0.4 + (j + 0.5) * width,
                            r["ms_per_step"],
                            width,
                            color=colors[library],
                            hatch=hatches.get(library),
                            edgecolor="white" if library in hatches else None,
                        )
        ax.set_xticks(range(len(algorithms)), [a.replace(" ", "\n") for a in algorithms])
        ax.set_yscale("log")
        ax.set_ylabel("ms per step (log)")
        ax.set_title(f"{tree} tree; dashed: single-pass floor of the first bar")
    handles = [
        plt.Rectangle(
            (0, 0),
            1,
            1,
            facecolor=colors[lib],
            hatch=hatches.get(lib),
            edgecolor="white" if lib in hatches else None,
        )
        for lib in libraries
    ]
    fig.legend(handles, libraries, loc="upper center", ncol=len(libraries))
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "jax_devices": [str(d) for d in jax.devices()],
        "python": platform.python_version(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "optim_zoo": optim_zoo.__version__,
        "gpu": "No GPU was available for these measurements (CPU only)",
    }
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    for module in ("torch", "pytorch_optimizer"):
        try:
            info[module] = importlib.import_module(module).__version__
        except Exception:
            pass
    try:
        info["timm"] = importlib.metadata.version("timm")
    except Exception:
        pass
    return info


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --- Main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny trees, few repeats")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch peers")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--only", nargs="*", default=None, help="algorithm or library names")
    parser.add_argument("--trees", nargs="*", default=None, help="subset of the trees")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--budget", type=float, default=None, help="seconds of timing per row")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 2)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    trees = QUICK_TREES if args.quick else TREES
    if args.trees:
        unknown = set(args.trees) - set(trees)
        if unknown:
            raise SystemExit(f"unknown trees {sorted(unknown)}; choose from {list(trees)}")
        trees = {k: v for k, v in trees.items() if k in args.trees}
    timing = (
        {"warmup": 1, "min_reps": 3, "budget_s": 0.0}
        if args.quick
        else {"warmup": 2, "min_reps": 3, "budget_s": 2.0 if args.budget is None else args.budget}
    )
    contenders = all_contenders(with_torch=not args.no_torch)
    if args.only:
        wanted = {w.lower() for w in args.only}
        contenders = [c for c in contenders if c.matches(wanted)]
        if not contenders:
            raise SystemExit(f"no contender matches {args.only}")
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else np.float32
    itemsize = np.dtype(dtype).itemsize
    stream_elements = 2**20 if args.quick else 2**26
    rounds = args.rounds or (1 if args.quick else 2)

    load_start = _load()
    bandwidths = [stream_bandwidth(stream_elements, 3, 5 if args.quick else 20)]
    print(f"stream bandwidth: {bandwidths[0] / 1e9:.1f} GB/s", flush=True)
    rows: list[dict] = []
    for tree_name, make_shapes in trees.items():
        shapes = make_shapes()
        params_np, grads_np = make_arrays(shapes, dtype)
        num_leaves = len(leaf_shapes(shapes))
        num_params = sum(int(np.prod(s)) for s in leaf_shapes(shapes))
        print(f"\n{tree_name}: {num_params / 1e6:.2f}M parameters in {num_leaves} leaves")
        prepared = []  # (row, name, run, finish) for every contender that could be built
        for contender in contenders:
            row: dict[str, Any] = {
                "tree": tree_name,
                "algorithm": contender.algorithm,
                "library": contender.library,
                "variant": contender.variant,
                "note": contender.note,
                "num_params": num_params,
                "num_leaves": num_leaves,
            }
            rows.append(row)
            reason = import_error(contender)
            if reason is None and contender.framework == "torch" and dtype != np.float32:
                reason = "float32 only"
            if reason is None:
                prepare = prepare_jax if contender.framework == "jax" else prepare_torch
                try:
                    run, finish = prepare(contender, params_np, grads_np)
                    run()  # A peer that fails at run time is recorded, not fatal.
                except Exception as e:
                    if contender.framework == "jax":
                        raise
                    reason = f"{type(e).__name__}: {e}"
            if reason is not None:
                row["skipped"] = reason
                print(f"  {contender.name:40s} skipped: {reason}", flush=True)
                continue
            prepared.append((row, contender.name, run, finish))
        # Rounds over all rows, so that a burst of load elsewhere on the machine hits one
        # round of every row rather than every round of one row; each row keeps its best
        # round's median.
        for round_index in range(rounds):
            for row, name, run, _ in prepared:
                result = _median_time(run, **timing)
                row.setdefault("round_medians_s", []).append(result["median_s"])
                row["reps"] = row.get("reps", 0) + result["reps"]
                row["min_s"] = min(row.get("min_s", np.inf), result["min_s"])
                row["max_s"] = max(row.get("max_s", 0.0), result["max_s"])
                if round_index == rounds - 1:
                    row["median_s"] = min(row["round_medians_s"])
                    row["ms_per_step"] = 1e3 * row["median_s"]
                    print(f"  {name:40s} {row['ms_per_step']:9.2f} ms", flush=True)
        for row, _, _, finish in prepared:
            row.update(finish())
            algorithm = ALGORITHMS[row["algorithm"]]
            sizes = row.get("state_itemsizes")
            state_sizes = None if sizes is None else StateItemsizes(**sizes)
            row.update(traffic(shapes, itemsize, row["state_bytes"], algorithm, state_sizes))
        prepared = run = finish = None  # Free this tree's arrays before the next one.
        gc.collect()
    bandwidths.append(stream_bandwidth(stream_elements, 3, 5 if args.quick else 20))
    bandwidth = max(bandwidths)
    for row in rows:
        if "skipped" in row:
            continue
        row["floor_ms"] = 1e3 * row["bytes_single"] / bandwidth
        row["floor_min_ms"] = 1e3 * row["bytes_min"] / bandwidth
        row["time_over_floor"] = row["ms_per_step"] / row["floor_ms"]
        row["time_over_min_floor"] = row["ms_per_step"] / row["floor_min_ms"]
        row["state_per_param"] = row["state_bytes"] / row["param_bytes"]
        row["overhead_us_per_leaf"] = (
            1e3 * max(row["ms_per_step"] - row["floor_ms"], 0.0) / row["num_leaves"]
        )

    tree_names = list(trees)
    table = markdown_table(rows, tree_names)
    headline = HEADLINE_TREE if HEADLINE_TREE in trees else tree_names[0]
    many = MANY_LEAVES_TREE if MANY_LEAVES_TREE in trees else tree_names[-1]
    checks = check_targets(rows, headline, many)
    result = {
        "config": {
            "quick": args.quick,
            "dtype": args.dtype,
            "trees": tree_names,
            "timing": timing,
            "rounds": rounds,
            "stream_elements": stream_elements,
            "command": "python benchmarks/step_time.py " + " ".join(argv or sys.argv[1:]),
        },
        "machine": machine_info(),
        "load_average": {"start": load_start, "end": _load()},
        "bandwidth_gbs": {"runs": [b / 1e9 for b in bandwidths], "used": bandwidth / 1e9},
        "algorithms": {name: a.passes for name, a in ALGORITHMS.items()},
        "rows": rows,
        "targets": checks,
        "table": table,
        "wall_s": time.perf_counter() - started,
    }
    print(f"\nbandwidth {bandwidth / 1e9:.1f} GB/s; load average {result['load_average']}\n")
    print(table)
    for check in checks:
        print(f"{'met   ' if check['met'] else 'MISSED'} {check['target']}: {check['value']}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "step_time.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "step_time.md").write_text(
        markdown_report(result, rows, tree_names, checks), encoding="utf-8"
    )
    if not args.no_plot:
        plot(rows, tree_names, args.out_dir / "step_time.png")
    return result


def markdown_report(result: dict, rows: list[dict], trees: Sequence[str], checks: list) -> str:
    machine = result["machine"]
    lines = [
        "# Optimizer step time against the memory-traffic floor",
        "",
        f"Command: `{result['config']['command'].strip()}`",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, "
        f"{machine.get('memory_gib', '?')} GiB; JAX {machine['jax']} on "
        f"{', '.join(machine['jax_devices'])}; optax {machine['optax']}"
        + (f"; torch {machine['torch']}" if "torch" in machine else "")
        + ". "
        + machine["gpu"]
        + ".",
        "",
        f"Stream bandwidth (in-place, donated): {result['bandwidth_gbs']['used']:.1f} GB/s "
        f"(runs: {', '.join(f'{b:.1f}' for b in result['bandwidth_gbs']['runs'])}). "
        f"Load average at start {result['load_average']['start']}, "
        f"at end {result['load_average']['end']}. Parameters: {result['config']['dtype']}.",
        "",
        "time/floor: ms per step over (bytes moved / bandwidth); '1 pass' reads every parameter,"
        " gradient and state byte once and writes parameters and state once; 'min' adds the"
        " re-reads that the algorithm's reductions force (docs/performance.md).",
        "",
        "Factored Adan, Factored Adai and Factored AdaiW are optim_zoo's `factored_adan` and"
        " `factored_adai` (decoupled=False / True) at Adan's, Adai's and AdaiW's"
        " hyperparameters. `optim_zoo [bf16 state]` rows keep the state in bfloat16"
        " (`dtype_momentum` and `dtype_second_moment`; Adafactor's momentum is off here, so"
        " only its statistics) with float32 parameters; the bytes moved and the re-reads count"
        " the state leaves at the dtype they are allocated in. Neither kind has peers or"
        " targets.",
        "",
        markdown_table(rows, trees),
        "## Targets",
        "",
    ]
    for check in checks:
        lines.append(
            f"- {'met' if check['met'] else '**missed**'}: {check['target']}: {check['value']}"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
