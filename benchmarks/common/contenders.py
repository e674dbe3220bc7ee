"""Every optimizer the benchmarks run, and the settings each runs with.

- `CONTENDERS`: the main job's eight (`benchmarks/compare.py`), at documented learning rates;
  the study (`benchmarks/claims/protocol.py`) grids each one's rate around it.
- `factored` and `bf16_state`: optim_zoo's options that no paper tested, as variants of a
  contender: its factored combination (`factored_adan`, `factored_adai`) and its moments
  stored in bfloat16. `benchmarks/claims/beyond.py` runs them on the study's tasks and
  `benchmarks/speed/step_time.py` times them.
- `implementations`: what `benchmarks/speed/step_time.py` times, every algorithm in optim_zoo, optax
  and the PyTorch peers, at one shared setting per algorithm.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import optax

import optim_zoo
from benchmarks.common import traffic


def format_kwargs(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in kwargs.items())


@dataclasses.dataclass(frozen=True)
class Contender:
    """One optimizer configuration: a factory and the keyword arguments it is called with."""

    name: str
    factory: Callable[..., optax.GradientTransformation]
    kwargs: dict[str, Any]

    def build(self) -> optax.GradientTransformation:
        return self.factory(**self.kwargs)

    @property
    def hyperparameters(self) -> str:
        return format_kwargs(self.kwargs)

    def rebound(self, package: types.ModuleType) -> Contender:
        """The same configuration built by `package`'s function of the same name (another
        version of optim_zoo, `benchmarks/speed/reference.py`)."""
        name = self.factory.__name__
        if not hasattr(package, name):
            raise AttributeError(f"{package.__name__} has no {name!r}")
        return dataclasses.replace(self, factory=getattr(package, name))


CONTENDERS: tuple[Contender, ...] = (
    # Adan's authors use learning rates 5-10x Adam's; 5e-3 is 5x the AdamW baseline below.
    Contender("optim_zoo.adan", optim_zoo.adan, {"learning_rate": 5e-3}),
    # learning_rate=None is the paper's relative step size min(1e-2, 1/sqrt(t)) times rms(p).
    # min_dim_size_to_factor=8 makes every weight matrix of this MLP (the smallest is 128x10)
    # use the factored second moment; the default of 128 would leave the last one unfactored.
    Contender(
        "optim_zoo.adafactor",
        optim_zoo.adafactor,
        {"learning_rate": None, "min_dim_size_to_factor": 8},
    ),
    # The Apollo README's starting point (lr 0.01, eps 1e-4, init_lr 1e-5) with a warmup
    # shortened from 500 to 100 steps to suit a run of about a thousand steps.
    Contender(
        "optim_zoo.apollo",
        optim_zoo.apollo,
        {"learning_rate": 1e-2, "init_lr": 1e-5, "warmup": 100},
    ),
    # Adai's learning rate lives on SGD's scale: the Adai README suggests plain SGD's
    # learning rate, i.e. about 10x that of SGD with momentum 0.9 (0.05 below).
    Contender("optim_zoo.adai", optim_zoo.adai, {"learning_rate": 0.5}),
    # AdaiW is Adai with decoupled weight decay; the value is the Adai README's 5e-4.
    Contender("optim_zoo.adaiw", optim_zoo.adaiw, {"learning_rate": 0.5, "weight_decay": 5e-4}),
    # CAME's steps are Adam-sized (a normalised update times the learning rate); the official
    # README's 2e-4 is for BERT-sized models, so this small MLP gets the AdamW baseline's 1e-3.
    Contender("optim_zoo.came", optim_zoo.came, {"learning_rate": 1e-3}),
    # Baselines: AdamW with its usual learning rate and optax's default decay, and SGD with
    # heavy-ball momentum.
    Contender("optax.adamw", optax.adamw, {"learning_rate": 1e-3, "weight_decay": 1e-4}),
    Contender("optax.sgd", optax.sgd, {"learning_rate": 0.05, "momentum": 0.9}),
)


# --- Variants: factored second moment, bfloat16 state -----------------------------------------

# The factored combination of each optimizer that has one: its factory and what it adds.
FACTORED_FORMS: dict[Callable[..., Any], tuple[Callable[..., Any], dict[str, Any]]] = {
    optim_zoo.adan: (optim_zoo.factored_adan, {}),
    optim_zoo.adai: (optim_zoo.factored_adai, {}),
    optim_zoo.adaiw: (optim_zoo.factored_adai, {"decoupled": True}),
}
BF16 = jnp.dtype(jnp.bfloat16)


def factored(contender: Contender, name: str, min_dim_size_to_factor: int) -> Contender:
    """`contender`'s factored combination with its arguments: Adan, Adai and AdaiW have one."""
    factory, extra = FACTORED_FORMS[contender.factory]
    kwargs = {**contender.kwargs, **extra, "min_dim_size_to_factor": min_dim_size_to_factor}
    return Contender(name, factory, kwargs)


def bf16_state(contender: Contender, name: str, *, stochastic: bool = False) -> Contender:
    """`contender` with its moments stored in bfloat16, with `stochastic` rounding or not.

    Adafactor runs without momentum here, so only its second-moment statistics change.
    """
    if contender.factory is optim_zoo.adafactor:
        dtypes = {"dtype_second_moment": BF16}
    else:
        dtypes = {"dtype_momentum": BF16, "dtype_second_moment": BF16}
    if stochastic:
        dtypes["state_rounding"] = "stochastic"
    return Contender(name, contender.factory, {**contender.kwargs, **dtypes})


EIGHT_BIT_SUFFIX = " [8-bit state]"


def eight_bit_state(
    contender: Contender, name: str | None = None, rounding: str = "stochastic"
) -> Contender:
    """`contender` with 8-bit state (``dtype_momentum=jnp.int8``, ``dtype_second_moment=
    jnp.uint8``) and `rounding` (stochastic by default); Adafactor without momentum has no
    momentum dtype."""
    dtypes: dict[str, Any] = {"dtype_second_moment": jnp.dtype(jnp.uint8)}
    if contender.factory is not optim_zoo.adafactor or contender.kwargs.get("momentum"):
        dtypes["dtype_momentum"] = jnp.dtype(jnp.int8)
    kwargs = {**contender.kwargs, **dtypes, "state_rounding": rounding}
    return Contender(name or contender.name + EIGHT_BIT_SUFFIX, contender.factory, kwargs)


# --- What the step-time benchmark times --------------------------------------------------------

# The optim_zoo optimizers the step-time benchmark also times with bfloat16 state.
ALGORITHMS_WITH_STATE_VARIANTS = (
    "Adan",
    "Factored Adan",
    "Adafactor",
    "Apollo",
    "Adai",
    "Factored Adai",
    "AdaiW",
    "Factored AdaiW",
    "CAME",
)

# Shared hyperparameters, one setting per algorithm for every implementation.
ADAN_HP = {"lr": 1e-3, "betas": (0.98, 0.92, 0.99), "eps": 1e-8, "weight_decay": 0.02}
ADAMW_HP = {"lr": 1e-3, "weight_decay": 1e-4}
APOLLO_HP = {"lr": 1e-2, "init_lr": 1e-5, "warmup": 500, "beta": 0.9, "eps": 1e-4}
ADAI_HP = {"lr": 0.1, "beta0": 0.1, "beta2": 0.99, "eps": 1e-3, "weight_decay": 5e-4}
# The official CAME README's example.
CAME_HP = {"lr": 2e-4, "betas": (0.9, 0.999, 0.9999), "eps": (1e-30, 1e-16), "weight_decay": 1e-2}
BF16_STATE = "bf16 state"
BF16_STATE_SR = "bf16 state, stochastic rounding"
EIGHT_BIT_STATE = "8-bit state, stochastic rounding"
NO_DECAY = "no decay"
L2_DECAY, DECOUPLED_DECAY, STABLE_DECAY = "L2 decay", "decoupled decay", "stable decay"
# The weight decay each decay variant runs (`traffic.DECAY_READS`).
DECAY_OF_VARIANT = {
    NO_DECAY: "none",
    L2_DECAY: "L2",
    DECOUPLED_DECAY: "decoupled",
    STABLE_DECAY: "stable",
}


def implementation_label(library: str, variant: str) -> str:
    """``optim_zoo``, or with a variant ``optim_zoo [bf16 state]``."""
    return library + (f" [{variant}]" if variant else "")


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One implementation of one algorithm.

    `make` returns an optax transformation (JAX) or, given the list of torch parameters, a torch
    optimizer. `module` is the import that a PyTorch peer needs; a failed import skips the row.
    `variant` names a non-default configuration of the same implementation (``bf16 state``);
    such rows have neither peers nor targets. An optim_zoo row keeps its `contender`, so that
    the same configuration can be built by another version of the package.
    """

    algorithm: str
    library: str
    make: Callable[..., Any]
    framework: str = "jax"
    module: str | None = None
    note: str = ""
    variant: str = ""
    # Left out of equality and hashing: its keyword arguments are a dict.
    contender: Contender | None = dataclasses.field(default=None, compare=False)

    @property
    def implementation(self) -> str:
        return implementation_label(self.library, self.variant)

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


def import_error(implementation: Implementation) -> str | None:
    """None when the implementation's framework and module import, else why they do not."""
    if implementation.framework != "torch":
        return None
    try:
        importlib.import_module("torch")
        if implementation.module and implementation.module.startswith("timm.optim."):
            _import_timm_optim(implementation.module.rsplit(".", 1)[1])
        elif implementation.module:
            importlib.import_module(implementation.module)
    except Exception as e:  # ImportError, or anything a broken install raises on import
        return f"{type(e).__name__}: {e}"
    return None


def _torch_implementations() -> list[Implementation]:
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

    def came_official(params):
        return importlib.import_module("came_pytorch").CAME(params, **CAME_HP)

    def po_came(params):
        return po("CAME")()(params, **CAME_HP)

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
        ("CAME", "came-pytorch", came_official, "came_pytorch", "official"),
        ("CAME", "pytorch-optimizer", po_came, "pytorch_optimizer", ""),
        ("Adan", "timm", timm_adan, "timm.optim.adan", ""),
        ("Adafactor", "timm", timm_adafactor, "timm.optim.adafactor", ""),
    ]
    return [
        Implementation(alg, lib, make, framework="torch", module=module, note=note)
        for alg, lib, make, module, note in torch_rows
    ]


def _optim_zoo_implementations() -> list[Implementation]:
    """Every optim_zoo optimizer at the shared hyperparameters, each followed by its
    bfloat16-state variant (float32 parameters: the math runs in float32 either way)."""
    hp, ap, ai = ADAN_HP, APOLLO_HP, ADAI_HP
    b1, b2, b3 = hp["betas"]
    adan_kwargs = {"b1": b1, "b2": b2, "b3": b3, "eps": hp["eps"], **_wd(hp)}
    adai_kwargs = {"beta0": ai["beta0"], "beta2": ai["beta2"], "eps": ai["eps"], **_wd(ai)}
    adan = Contender("Adan", optim_zoo.adan, {"learning_rate": hp["lr"], **adan_kwargs})
    apollo_kwargs = {"beta": ap["beta"], "eps": ap["eps"], "init_lr": ap["init_lr"]}
    apollo = Contender(
        "Apollo",
        optim_zoo.apollo,
        {"learning_rate": ap["lr"], **apollo_kwargs, "warmup": ap["warmup"]},
    )
    adai = Contender("Adai", optim_zoo.adai, {"learning_rate": ai["lr"], **adai_kwargs})
    adaiw = Contender("AdaiW", optim_zoo.adaiw, {"learning_rate": ai["lr"], **adai_kwargs})
    ch = CAME_HP
    came_kwargs = dict(zip(("b1", "b2", "b3"), ch["betas"], strict=True))
    came_kwargs |= {"eps": ch["eps"][0], "eps_confidence": ch["eps"][1], **_wd(ch)}
    came = Contender("CAME", optim_zoo.came, {"learning_rate": ch["lr"], **came_kwargs})
    threshold = traffic.MIN_DIM_SIZE_TO_FACTOR
    optimizers = [
        adan,
        factored(adan, "Factored Adan", threshold),
        Contender("Adafactor", optim_zoo.adafactor, {}),
        apollo,
        adai,
        factored(adai, "Factored Adai", threshold),
        adaiw,
        factored(adaiw, "Factored AdaiW", threshold),
        came,
    ]
    rows = []
    for contender in optimizers:
        half = bf16_state(contender, contender.name)
        rounded = bf16_state(contender, contender.name, stochastic=True)
        note = "no momentum here: statistics only" if "dtype_momentum" not in half.kwargs else ""
        rows.append(_optim_zoo_row(contender))
        rows.append(_optim_zoo_row(half, note=note, variant=BF16_STATE))
        rows.append(_optim_zoo_row(rounded, note=note, variant=BF16_STATE_SR))
    # The same optimizers with another weight decay (or none): what a decay type costs.
    decays = [
        (adan, NO_DECAY, {"weight_decay": 0.0}),
        (adan, DECOUPLED_DECAY, {"no_prox": True}),
        (Contender("Adafactor", optim_zoo.adafactor, {}), DECOUPLED_DECAY, _ADAFACTOR_DECAY),
        *[
            (apollo, variant, {"weight_decay": ai["weight_decay"], "weight_decay_type": kind})
            for variant, kind in ((L2_DECAY, "L2"), (DECOUPLED_DECAY, "decoupled"))
            + ((STABLE_DECAY, "stable"),)
        ],
        (adai, NO_DECAY, {"weight_decay": 0.0}),
        (factored(adai, "Factored Adai", threshold), NO_DECAY, {"weight_decay": 0.0}),
        (came, NO_DECAY, {"weight_decay": 0.0}),
    ]
    for contender, variant, kwargs in decays:
        other = Contender(contender.name, contender.factory, {**contender.kwargs, **kwargs})
        rows.append(_optim_zoo_row(other, variant=variant))
    return rows


def _optim_zoo_row(contender: Contender, note: str = "", variant: str = "") -> Implementation:
    return Implementation(
        contender.name,
        "optim_zoo",
        contender.build,
        note=note,
        variant=variant,
        contender=contender,
    )


# Adafactor's decay (not scaled by the learning rate): the official Adafactor's order of size.
_ADAFACTOR_DECAY = {"weight_decay_rate": 1e-3}

# Which rows `benchmarks/speed/step_time.py` times together: every row compared with another (below)
# shares its family.
TIMING_FAMILY = {
    "Factored Adan": "Adan",
    "Factored Adai": "Adai",
    "AdaiW": "Adai",
    "Factored AdaiW": "Adai",
}

# What each variant row is compared with in the same run, and the ratio it should stay within:
# (algorithm, variant) over (algorithm, variant) <= limit. A memory option (factored statistics,
# bfloat16 state) moves fewer bytes, so it should be no slower; a weight decay adds one
# elementwise term, so it should cost at most 10%.
COMPARISONS: tuple[tuple[tuple[str, str], tuple[str, str], float], ...] = (
    *[
        ((algorithm, variant), (algorithm, ""), 1.0)
        for algorithm in ALGORITHMS_WITH_STATE_VARIANTS
        for variant in (BF16_STATE, BF16_STATE_SR)
    ],
    *[
        ((algorithm, BF16_STATE_SR), (algorithm, BF16_STATE), 1.0)
        for algorithm in ALGORITHMS_WITH_STATE_VARIANTS
    ],
    (("Factored Adan", ""), ("Adan", ""), 1.0),
    (("Factored Adai", ""), ("Adai", ""), 1.0),
    (("Factored AdaiW", ""), ("AdaiW", ""), 1.0),
    (("Adan", ""), ("Adan", NO_DECAY), 1.1),  # proximal decay
    (("Adan", DECOUPLED_DECAY), ("Adan", NO_DECAY), 1.1),
    (("Adafactor", DECOUPLED_DECAY), ("Adafactor", ""), 1.1),
    (("Apollo", L2_DECAY), ("Apollo", ""), 1.1),
    (("Apollo", DECOUPLED_DECAY), ("Apollo", ""), 1.1),
    (("Apollo", STABLE_DECAY), ("Apollo", ""), 1.1),
    (("Adai", ""), ("Adai", NO_DECAY), 1.1),  # L2 decay
    (("AdaiW", ""), ("Adai", NO_DECAY), 1.1),  # decoupled decay
    (("Factored Adai", ""), ("Factored Adai", NO_DECAY), 1.1),  # L2 decay
    (("Factored AdaiW", ""), ("Factored Adai", NO_DECAY), 1.1),  # decoupled decay
    (("CAME", ""), ("CAME", NO_DECAY), 1.1),  # decoupled decay
)


def _jax_implementations() -> list[Implementation]:
    hp = ADAN_HP
    b1, b2, b3 = hp["betas"]
    adan_kwargs = {"b1": b1, "b2": b2, "b3": b3, "eps": hp["eps"]}
    rows = [
        Implementation("AdamW", "optax", lambda: optax.adamw(ADAMW_HP["lr"], **_wd(ADAMW_HP))),
        Implementation(
            "Adan",
            "optax",
            lambda: optax.adan(hp["lr"], weight_decay=hp["weight_decay"], **adan_kwargs),
            note="not the official algorithm",
        ),
        Implementation("Adafactor", "optax", lambda: optax.adafactor()),
    ]
    return _optim_zoo_implementations() + rows


def _wd(hp: dict) -> dict:
    return {"weight_decay": hp["weight_decay"]}


def implementations(with_torch: bool) -> list[Implementation]:
    """Every implementation the step-time benchmark times, in `traffic.ALGORITHMS` order."""
    rows = _jax_implementations()
    if with_torch:
        rows += _torch_implementations()
    order = list(traffic.ALGORITHMS)
    # Stable: optim_zoo first, each optimizer followed by its variant, then the peers.
    return sorted(rows, key=lambda c: order.index(c.algorithm))
