"""Float64 NumPy transcriptions of each optimizer's official update, written from SPEC.md.

These are deliberately plain: one loop over leaves, one line per line of the SPEC, no JAX. They
are the independent second implementation the package is compared against, and are themselves
checked against the public goldens (``tests/test_goldens.py``).

Every optimizer is a small class with ``step(params, grads) -> new_params`` working on a list of
float64 arrays (one per pytree leaf, in ``jax.tree.leaves`` order). ``run`` drives one over a
gradient function and also accepts a dict of leaves. A learning rate is a float or a callable of
the step count *before* increment (the optax schedule convention).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

Leaves = list[np.ndarray]
LearningRate = float | Callable[[int], float]


def _lr_at(learning_rate: LearningRate, count: int) -> float:
    # optax schedules are evaluated at the count before increment: step 1 sees count 0.
    return float(learning_rate(count)) if callable(learning_rate) else float(learning_rate)


def _mask_or_all(mask: Sequence[bool] | None, num_leaves: int) -> list[bool]:
    return [True] * num_leaves if mask is None else list(mask)


def _rms(x: np.ndarray) -> float:
    return math.sqrt(float(np.mean(x * x)))


# --------------------------------------------------------------------------------------------
# Adan (SPEC "## Adan"; sail-sg/Adan adan.py).
# --------------------------------------------------------------------------------------------
class Adan:
    """Adan with the official betas convention, proximal or decoupled decay, optional clip."""

    def __init__(
        self,
        learning_rate: LearningRate,
        b1: float = 0.98,
        b2: float = 0.92,
        b3: float = 0.99,
        eps: float = 1e-8,
        eps_root: float = 0.0,
        weight_decay: float = 0.0,
        no_prox: bool = False,
        weight_decay_mask: Sequence[bool] | None = None,
        max_grad_norm: float | None = None,
    ):
        self.learning_rate = learning_rate
        self.b1, self.b2, self.b3 = b1, b2, b3
        self.eps, self.eps_root = eps, eps_root
        self.weight_decay = weight_decay
        self.no_prox = no_prox
        self.weight_decay_mask = weight_decay_mask
        self.max_grad_norm = max_grad_norm
        self.count = 0
        self.m = self.v = self.n = self.prev_grad = None

    def step(self, params: Leaves, grads: Leaves) -> Leaves:
        b1, b2, b3 = self.b1, self.b2, self.b3
        if self.m is None:
            self.m = [np.zeros_like(p) for p in params]
            self.v = [np.zeros_like(p) for p in params]
            self.n = [np.zeros_like(p) for p in params]
        lr = _lr_at(self.learning_rate, self.count)
        self.count += 1
        t = self.count

        if self.max_grad_norm is not None:
            # SPEC: factor min(max_grad_norm / (global_norm + eps), 1) over all leaves; the
            # clipped gradient is what is stored as g_prev below.
            global_norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads))
            factor = min(self.max_grad_norm / (global_norm + self.eps), 1.0)
            grads = [g * factor for g in grads]

        if self.prev_grad is None:
            # SPEC: "g_prev starts as g", so diff is 0 on the first step.
            self.prev_grad = [g.copy() for g in grads]

        decay_mask = _mask_or_all(self.weight_decay_mask, len(params))
        new_params = []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            diff = g - self.prev_grad[i]
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * diff
            # SPEC: coefficient b2 (not 1 - b2) inside the squared term.
            self.n[i] = b3 * self.n[i] + (1 - b3) * (g + b2 * diff) ** 2
            numerator = self.m[i] / (1 - b1**t) + b2 * self.v[i] / (1 - b2**t)
            denom = np.sqrt(self.n[i] / (1 - b3**t) + self.eps_root) + self.eps
            direction = numerator / denom
            self.prev_grad[i] = g.copy()

            wd = self.weight_decay if decay_mask[i] else 0.0
            if self.no_prox:
                # SPEC: p_new = p*(1 - lr*wd) - lr*direction
                new_params.append(p * (1 - lr * wd) - lr * direction)
            else:
                # SPEC (default, proximal): p_new = (p - lr*direction) / (1 + lr*wd)
                new_params.append((p - lr * direction) / (1 + lr * wd))
        return new_params


# --------------------------------------------------------------------------------------------
# Adafactor (SPEC "## Adafactor"; tensor2tensor utils/adafactor.py, optax signature).
# --------------------------------------------------------------------------------------------
def factored_dims(shape: tuple[int, ...], min_dim_size_to_factor: int) -> tuple[int, int] | None:
    """Returns (second-largest axis, largest axis) or None if the leaf is not factored.

    SPEC: the two largest dims, ties going to the later axes; factored when there are 2+ dims
    and the second-largest dim is >= min_dim_size_to_factor (so 0 factors every 2+-dim leaf).
    """
    if len(shape) < 2:
        return None
    # Sorting by (size, axis) ranks a later axis above an earlier one of equal size.
    order = sorted(range(len(shape)), key=lambda axis: (shape[axis], axis))
    second, largest = order[-2], order[-1]
    if shape[second] < min_dim_size_to_factor:
        return None
    return second, largest


class Adafactor:
    """Adafactor as tensor2tensor computes it, with optax's extras (momentum on the step, wd)."""

    def __init__(
        self,
        learning_rate: LearningRate | None = None,
        min_dim_size_to_factor: int = 128,
        decay_rate: float = 0.8,
        decay_offset: int = 0,
        multiply_by_parameter_scale: bool = True,
        clipping_threshold: float | None = 1.0,
        momentum: float | None = None,
        weight_decay_rate: float | None = None,
        eps: float = 1e-30,
        factored: bool = True,
        weight_decay_mask: Sequence[bool] | None = None,
    ):
        self.learning_rate = learning_rate
        self.min_dim_size_to_factor = min_dim_size_to_factor
        self.decay_rate = decay_rate
        self.decay_offset = decay_offset
        self.multiply_by_parameter_scale = multiply_by_parameter_scale
        self.clipping_threshold = clipping_threshold
        self.momentum = momentum
        self.weight_decay_rate = weight_decay_rate
        self.eps = eps
        self.factored = factored
        self.weight_decay_mask = weight_decay_mask
        self.count = 0  # SPEC: "c counts steps from 0"
        self.stats = None  # per leaf: ('factored', r, k, axes) or ('full', v)
        self.m = None

    def _learning_rate(self) -> float:
        if self.learning_rate is None:
            # SPEC: relative step size min(1e-2, 1/sqrt(t)), t 1-based, times 0.05 without
            # parameter scaling.
            t = self.count + 1
            lr = min(1e-2, 1.0 / math.sqrt(t))
            return lr if self.multiply_by_parameter_scale else 0.05 * lr
        return _lr_at(self.learning_rate, self.count)

    def step(self, params: Leaves, grads: Leaves) -> Leaves:
        if self.stats is None:
            self.stats = []
            for p in params:
                axes = (
                    factored_dims(p.shape, self.min_dim_size_to_factor) if self.factored else None
                )
                if axes is None:
                    self.stats.append(("full", np.zeros_like(p)))
                else:
                    second, largest = axes
                    # Reduced stats kept with keepdims so broadcasting needs no axis bookkeeping.
                    r = np.zeros_like(np.mean(p, axis=largest, keepdims=True))
                    k = np.zeros_like(np.mean(p, axis=second, keepdims=True))
                    self.stats.append(("factored", r, k, axes))
            self.m = [np.zeros_like(p) for p in params]

        c = self.count
        # SPEC: decay = 1 - (c - decay_offset + 1) ** (-decay_rate); 0 on the first step.
        decay = 1.0 - (c - self.decay_offset + 1.0) ** (-self.decay_rate)
        lr = self._learning_rate()
        decay_mask = _mask_or_all(self.weight_decay_mask, len(params))

        new_params = []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            g2 = g * g + self.eps  # SPEC: g2 = g**2 + eps
            stat = self.stats[i]
            if stat[0] == "factored":
                _, r, k, (second, largest) = stat
                # SPEC: r averages g2 over the larger factored dim, k over the other one.
                r = decay * r + (1 - decay) * np.mean(g2, axis=largest, keepdims=True)
                k = decay * k + (1 - decay) * np.mean(g2, axis=second, keepdims=True)
                self.stats[i] = ("factored", r, k, (second, largest))
                # SPEC: x = g * rsqrt(r / mean(r)) * rsqrt(k); mean(r) is per batch slice.
                r_mean = np.mean(r, axis=second, keepdims=True)
                x = g / np.sqrt(r / r_mean) / np.sqrt(k)
            else:
                v = decay * stat[1] + (1 - decay) * g2
                self.stats[i] = ("full", v)
                x = g / np.sqrt(v)  # SPEC: x = g * rsqrt(v)

            if self.clipping_threshold is not None:
                # SPEC: x = x / max(1, rms(x) / clipping_threshold), per tensor.
                x = x / max(1.0, _rms(x) / self.clipping_threshold)

            update = lr * x
            if self.multiply_by_parameter_scale:
                # SPEC: step *= max(1e-3, rms(p)), per tensor, with the pre-update parameter.
                update = update * max(1e-3, _rms(p))

            if self.momentum is not None:
                # SPEC: momentum on the scaled step, no debiasing.
                self.m[i] = self.momentum * self.m[i] + (1 - self.momentum) * update
                update = self.m[i]

            if self.weight_decay_rate is not None and decay_mask[i]:
                update = update + self.weight_decay_rate * p  # SPEC: not scaled by lr
            new_params.append(p - update)
        self.count += 1
        return new_params


# --------------------------------------------------------------------------------------------
# Apollo (SPEC "## Apollo"; XuezheMax/apollo optim/apollo.py).
# --------------------------------------------------------------------------------------------
class Apollo:
    """Apollo (Ma 2020) with warmup, constant/belief rebound and its three weight decays."""

    def __init__(
        self,
        learning_rate: LearningRate,
        beta: float = 0.9,
        eps: float = 1e-4,
        rebound: str = "constant",
        warmup: int = 500,
        init_lr: float | None = None,
        weight_decay: float = 0.0,
        weight_decay_type: str | None = None,
        weight_decay_mask: Sequence[bool] | None = None,
    ):
        if init_lr is None:
            if callable(learning_rate):
                raise ValueError("the reference needs an explicit init_lr with a schedule")
            init_lr = learning_rate / 1000  # SPEC: default init_lr = learning_rate / 1000
        if weight_decay_type is None:
            # SPEC: None means 'L2' for the constant rebound and 'decoupled' for belief.
            weight_decay_type = "L2" if rebound == "constant" else "decoupled"
        self.learning_rate = learning_rate
        self.beta, self.eps = beta, eps
        self.rebound = rebound
        self.warmup = warmup
        self.init_lr = init_lr
        self.weight_decay = weight_decay
        self.weight_decay_type = weight_decay_type
        self.weight_decay_mask = weight_decay_mask
        self.count = 0
        self.m = self.hessian_diag = self.direction = None

    def _learning_rate(self, count: int) -> float:
        # SPEC: linear warmup from init_lr evaluated at the count BEFORE increment, so step 1
        # uses exactly init_lr; warmup=0 means the plain learning rate from the first step.
        target = _lr_at(self.learning_rate, count)
        if count < self.warmup:
            return self.init_lr + (target - self.init_lr) * count / self.warmup
        return target

    def step(self, params: Leaves, grads: Leaves) -> Leaves:
        if self.m is None:
            self.m = [np.zeros_like(p) for p in params]
            self.hessian_diag = [np.zeros_like(p) for p in params]
            self.direction = [np.zeros_like(p) for p in params]
        lr = self._learning_rate(self.count)
        self.count += 1
        t = self.count
        beta = self.beta
        decay_mask = _mask_or_all(self.weight_decay_mask, len(params))

        new_params = []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            wd = self.weight_decay if decay_mask[i] else 0.0
            if self.weight_decay_type == "L2":
                g = g + wd * p  # SPEC: if weight_decay_type == 'L2': g = g + wd*p

            alpha = (1 - beta) / (1 - beta**t)
            dg = g - self.m[i]
            if self.rebound == "belief":
                sigma = float(np.max(np.abs(dg)))  # SPEC: sigma = max|dg| per tensor
                e = self.eps
            else:
                sigma = 0.01  # SPEC: constant: sigma = 0.01, e = eps / 0.01
                e = self.eps / 0.01

            self.m[i] = self.m[i] + alpha * dg

            d = self.direction[i]
            norm4 = float(np.sum(d**4)) ** 0.25  # 4-norm of the previous direction
            dn = d / (norm4 + e)
            # SPEC: delta = -alpha*sum(dg/(||d||_4 + e) * dn) - sum(B * dn**2), per tensor.
            delta = -alpha * float(np.sum(dg / (norm4 + e) * dn)) - float(
                np.sum(self.hessian_diag[i] * dn**2)
            )
            self.hessian_diag[i] = self.hessian_diag[i] + delta * dn**2

            denom = np.maximum(np.abs(self.hessian_diag[i]), sigma)
            if self.rebound == "belief":
                denom = denom + e / alpha  # SPEC: (+ e/alpha for belief)
            d = self.m[i] / denom

            if self.weight_decay_type in ("decoupled", "stable"):
                # SPEC: the stored direction INCLUDES this decay term.
                w = wd / float(np.mean(denom)) if self.weight_decay_type == "stable" else wd
                d = d + w * p
            self.direction[i] = d
            new_params.append(p - lr * d)
        return new_params


# --------------------------------------------------------------------------------------------
# Adai / AdaiW / AdaiV2 (SPEC "## Adai / AdaiW"; zeke-xie/adaptive-inertia-adai adai_optim).
# --------------------------------------------------------------------------------------------
class Adai:
    """Adai with a global v_bar over every leaf; ``decoupled=True`` is AdaiW.

    ``learning_rate`` may also be a list with one rate per leaf, which is how the official code's
    parameter groups (one shared v_bar, separate learning rates) are expressed.
    """

    def __init__(
        self,
        learning_rate: LearningRate | Sequence[float],
        beta0: float = 0.1,
        beta2: float = 0.99,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        decoupled: bool = False,
        weight_decay_mask: Sequence[bool] | None = None,
        dampening: float = 1.0,
    ):
        self.learning_rate = learning_rate
        self.beta0, self.beta2, self.eps = beta0, beta2, eps
        self.weight_decay = weight_decay
        self.decoupled = decoupled
        self.weight_decay_mask = weight_decay_mask
        self.dampening = dampening
        self.count = 0
        self.m = self.v = self.beta1_prod = None

    def step(self, params: Leaves, grads: Leaves) -> Leaves:
        if self.m is None:
            self.m = [np.zeros_like(p) for p in params]
            self.v = [np.zeros_like(p) for p in params]
            self.beta1_prod = [np.ones_like(p) for p in params]  # SPEC: starts at ONES
        if isinstance(self.learning_rate, (list, tuple)):
            lrs = [float(lr) for lr in self.learning_rate]
        else:
            lrs = [_lr_at(self.learning_rate, self.count)] * len(params)
        self.count += 1
        t = self.count
        beta0, beta2, damp = self.beta0, self.beta2, self.dampening
        decay_mask = _mask_or_all(self.weight_decay_mask, len(params))

        # First pass: second moments and the GLOBAL mean of v_hat over every element.
        grads = list(grads)
        v_hat = []
        total, size = 0.0, 0
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            wd = self.weight_decay if decay_mask[i] else 0.0
            if not self.decoupled:
                grads[i] = g = g + wd * p  # SPEC: L2 folds the decay into the gradient
            self.v[i] = beta2 * self.v[i] + (1 - beta2) * g * g
            v_hat.append(self.v[i] / (1 - beta2**t))
            total += float(np.sum(v_hat[i]))
            size += v_hat[i].size
        v_bar = total / size

        # Second pass: per-element inertia and the parameter update.
        new_params = []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            # SPEC: v_bar == 0 (all gradients zero) is treated as a ratio of 0, not NaN.
            ratio = v_hat[i] / v_bar if v_bar != 0.0 else np.zeros_like(v_hat[i])
            # SPEC (AdaiV2): exponent 1/(3 - 2*dampening); dampening=1 gives plain Adai.
            beta1 = np.clip(1 - beta0 * ratio ** (1 / (3 - 2 * damp)), 0.0, 1 - self.eps)
            self.beta1_prod[i] = self.beta1_prod[i] * beta1
            self.m[i] = beta1 * self.m[i] + (1 - beta1) ** damp * g
            direction = self.m[i] / (1 - self.beta1_prod[i]) * beta0 ** (1 - damp)
            lr = lrs[i]
            wd = self.weight_decay if decay_mask[i] else 0.0
            if self.decoupled:
                new_params.append(p * (1 - lr * wd) - lr * direction)  # SPEC: AdaiW
            else:
                new_params.append(p - lr * direction)
        return new_params


def adaiw(learning_rate: LearningRate, **kwargs) -> Adai:
    """AdaiW is Adai with decoupled weight decay."""
    return Adai(learning_rate, decoupled=True, **kwargs)


# --------------------------------------------------------------------------------------------
# Factored Adan and Adai: optim_zoo's own combinations (no paper, no official code). Written from
# the rule in the docstrings of optim_zoo.factored_adan / factored_adai: the second moment of
# each leaf that `factored_dims` factors is kept as EMAs R, C of the mean square over its two
# largest axes and read as (R / mean(R)) * C, zero where mean(R) = 0; other leaves keep it full.
# --------------------------------------------------------------------------------------------
class FactoredSquare:
    """EMA of ``x**2`` for one leaf, full or factored; ``estimate()`` rebuilds the full array."""

    def __init__(self, shape: tuple[int, ...], min_dim_size_to_factor: int):
        self.axes = factored_dims(shape, min_dim_size_to_factor)
        if self.axes is None:
            self.full = np.zeros(shape)
        else:
            second, largest = self.axes
            # Kept with keepdims: R lacks the largest axis, C the second-largest.
            self.row = np.zeros([1 if a == largest else d for a, d in enumerate(shape)])
            self.col = np.zeros([1 if a == second else d for a, d in enumerate(shape)])

    def update(self, x: np.ndarray, decay: float) -> None:
        if self.axes is None:
            self.full = decay * self.full + (1 - decay) * x * x
            return
        second, largest = self.axes
        self.row = decay * self.row + (1 - decay) * np.mean(x * x, axis=largest, keepdims=True)
        self.col = decay * self.col + (1 - decay) * np.mean(x * x, axis=second, keepdims=True)

    def estimate(self) -> np.ndarray:
        if self.axes is None:
            return self.full.copy()
        second, _ = self.axes
        # mean(R) per batch slice; where it is 0 (no non-zero gradient yet) the estimate is 0.
        row_mean = np.mean(self.row, axis=second, keepdims=True)
        ratio = np.where(row_mean > 0, self.row / np.where(row_mean > 0, row_mean, 1.0), 0.0)
        return ratio * self.col


class FactoredAdan:
    """Adan (as ``Adan`` above) with ``n`` kept by ``FactoredSquare`` (decay b3)."""

    def __init__(
        self,
        learning_rate: LearningRate,
        b1: float = 0.98,
        b2: float = 0.92,
        b3: float = 0.99,
        eps: float = 1e-8,
        eps_root: float = 0.0,
        weight_decay: float = 0.0,
        no_prox: bool = False,
        weight_decay_mask: Sequence[bool] | None = None,
        max_grad_norm: float | None = None,
        min_dim_size_to_factor: int = 128,
    ):
        self.learning_rate = learning_rate
        self.b1, self.b2, self.b3 = b1, b2, b3
        self.eps, self.eps_root = eps, eps_root
        self.weight_decay = weight_decay
        self.no_prox = no_prox
        self.weight_decay_mask = weight_decay_mask
        self.max_grad_norm = max_grad_norm
        self.min_dim_size_to_factor = min_dim_size_to_factor
        self.count = 0
        self.m = self.v = self.n = self.prev_grad = None

    def step(self, params: Leaves, grads: Leaves) -> Leaves:
        b1, b2, b3 = self.b1, self.b2, self.b3
        if self.m is None:
            self.m = [np.zeros_like(p) for p in params]
            self.v = [np.zeros_like(p) for p in params]
            self.n = [FactoredSquare(p.shape, self.min_dim_size_to_factor) for p in params]
        lr = _lr_at(self.learning_rate, self.count)
        self.count += 1
        t = self.count

        if self.max_grad_norm is not None:
            global_norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads))
            factor = min(self.max_grad_norm / (global_norm + self.eps), 1.0)
            grads = [g * factor for g in grads]
        if self.prev_grad is None:
            self.prev_grad = [g.copy() for g in grads]

        decay_mask = _mask_or_all(self.weight_decay_mask, len(params))
        new_params = []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            diff = g - self.prev_grad[i]
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * diff
            self.n[i].update(g + b2 * diff, b3)
            n_hat = self.n[i].estimate() / (1 - b3**t)
            numerator = self.m[i] / (1 - b1**t) + b2 * self.v[i] / (1 - b2**t)
            direction = numerator / (np.sqrt(n_hat + self.eps_root) + self.eps)
            self.prev_grad[i] = g.copy()

            wd = self.weight_decay if decay_mask[i] else 0.0
            if self.no_prox:
                new_params.append(p * (1 - lr * wd) - lr * direction)
            else:
                new_params.append((p - lr * direction) / (1 + lr * wd))
        return new_params


class FactoredAdai:
    """Adai (as ``Adai`` above) with ``v`` kept by ``FactoredSquare`` (decay beta2).

    The estimate replaces ``v`` everywhere Adai reads it, the global mean ``v_bar`` included.
    """

    def __init__(
        self,
        learning_rate: LearningRate,
        beta0: float = 0.1,
        beta2: float = 0.99,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        decoupled: bool = False,
        weight_decay_mask: Sequence[bool] | None = None,
        dampening: float = 1.0,
        min_dim_size_to_factor: int = 128,
    ):
        self.learning_rate = learning_rate
        self.beta0, self.beta2, self.eps = beta0, beta2, eps
        self.weight_decay = weight_decay
        self.decoupled = decoupled
        self.weight_decay_mask = weight_decay_mask
        self.dampening = dampening
        self.min_dim_size_to_factor = min_dim_size_to_factor
        self.count = 0
        self.m = self.v = self.beta1_prod = None

    def step(self, params: Leaves, grads: Leaves) -> Leaves:
        if self.m is None:
            self.m = [np.zeros_like(p) for p in params]
            self.v = [FactoredSquare(p.shape, self.min_dim_size_to_factor) for p in params]
            self.beta1_prod = [np.ones_like(p) for p in params]
        lr = _lr_at(self.learning_rate, self.count)
        self.count += 1
        t = self.count
        beta0, beta2, damp = self.beta0, self.beta2, self.dampening
        decay_mask = _mask_or_all(self.weight_decay_mask, len(params))

        grads = list(grads)
        v_hat = []
        for i, p in enumerate(params):
            wd = self.weight_decay if decay_mask[i] else 0.0
            if not self.decoupled:
                grads[i] = grads[i] + wd * p
            self.v[i].update(grads[i], beta2)
            v_hat.append(self.v[i].estimate() / (1 - beta2**t))
        v_bar = sum(float(np.sum(x)) for x in v_hat) / sum(x.size for x in v_hat)

        new_params = []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            ratio = v_hat[i] / v_bar if v_bar != 0.0 else np.zeros_like(v_hat[i])
            beta1 = np.clip(1 - beta0 * ratio ** (1 / (3 - 2 * damp)), 0.0, 1 - self.eps)
            self.beta1_prod[i] = self.beta1_prod[i] * beta1
            self.m[i] = beta1 * self.m[i] + (1 - beta1) ** damp * g
            direction = self.m[i] / (1 - self.beta1_prod[i]) * beta0 ** (1 - damp)
            wd = self.weight_decay if decay_mask[i] else 0.0
            if self.decoupled:
                new_params.append(p * (1 - lr * wd) - lr * direction)
            else:
                new_params.append(p - lr * direction)
        return new_params


# --------------------------------------------------------------------------------------------
# Driver.
# --------------------------------------------------------------------------------------------
GradFn = Callable[[Leaves, int], Leaves]


def run(optimizer, params0, grad_fn: GradFn, num_steps: int) -> list:
    """Runs ``num_steps`` steps; returns the parameters after each one.

    ``params0`` is a list of arrays or a dict of them (leaves taken in sorted-key order, as
    ``jax.tree.leaves`` does). ``grad_fn(leaves, t)`` gets the CURRENT parameters and the 1-based
    step number. The returned trajectory has the same container type as ``params0``.
    """
    is_dict = isinstance(params0, dict)
    keys = sorted(params0) if is_dict else None
    leaves = [np.array(p, np.float64) for _, p in _items(params0)]
    trajectory = []
    for t in range(1, num_steps + 1):
        grads = [np.asarray(g, np.float64) for g in grad_fn(leaves, t)]
        leaves = optimizer.step(leaves, grads)
        trajectory.append(dict(zip(keys, leaves, strict=True)) if is_dict else list(leaves))
    return trajectory


def _items(params0):
    if isinstance(params0, dict):
        return [(k, params0[k]) for k in sorted(params0)]
    return list(enumerate(params0))
