"""scikit-learn's 8x8 digits and the MLP that the main job trains, shared with the study's tasks.

The main job (`benchmarks/compare.py`) trains the MLP on this split; the study's digits tasks
(`benchmarks/claims/tasks.py`) hold out part of its training images for validation and train
the same MLP, or a small CNN initialised the same way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

HIDDEN_SIZES = (128, 128)
NUM_CLASSES = 10
NUM_FEATURES = 64  # 8x8 pixels


# A pytree, so that the jitted functions take the arrays as arguments rather than baking them
# into each compiled program as constants.
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Dataset:
    x_train: jax.Array
    y_train: jax.Array
    x_test: jax.Array
    y_test: jax.Array


def load_digits_dataset() -> Dataset:
    """scikit-learn's digits, split 75/25 (stratified, fixed seed), standardised on train."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )
    scaler = StandardScaler().fit(x_train)
    return Dataset(
        x_train=jnp.asarray(scaler.transform(x_train), jnp.float32),
        y_train=jnp.asarray(y_train, jnp.int32),
        x_test=jnp.asarray(scaler.transform(x_test), jnp.float32),
        y_test=jnp.asarray(y_test, jnp.int32),
    )


def mlp_sizes(num_features: int = NUM_FEATURES) -> tuple[int, ...]:
    """The MLP's layer widths, input to output."""
    return (num_features, *HIDDEN_SIZES, NUM_CLASSES)


def he_normal(key: jax.Array, fan_in: int, fan_out: int) -> jax.Array:
    """A (fan_in, fan_out) float32 weight matrix ~ N(0, 2 / fan_in), for ReLU layers."""
    return jax.random.normal(key, (fan_in, fan_out), jnp.float32) * math.sqrt(2.0 / fan_in)


def init_mlp(key: jax.Array, sizes: Sequence[int]) -> list[dict[str, jax.Array]]:
    """He-normal weights and zero biases for a ReLU MLP with layer widths `sizes`."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": he_normal(k, fan_in, fan_out), "b": jnp.zeros((fan_out,), jnp.float32)}
        for k, fan_in, fan_out in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mlp_logits(params: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def minibatch_order(num_examples: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """Row indices of every minibatch, shape (steps, batch_size): shuffled epochs, concatenated.

    Computed once and shared, so every optimizer sees exactly the same sequence of batches.
    """
    rng = np.random.default_rng(seed)
    epochs = math.ceil(steps * batch_size / num_examples)
    order = np.concatenate([rng.permutation(num_examples) for _ in range(epochs)])
    return order[: steps * batch_size].reshape(steps, batch_size).astype(np.int32)
