"""The study's problems: data, models, losses and metrics, all built offline and deterministically.

Every task is a `Task`: how to initialise parameters from a seed, the per-seed sequence of
minibatches (or gradient noise), the loss whose gradient trains, and the metrics recorded at
each evaluation. The engine in `benchmarks/claims/protocol.py` trains any task with any
optimizer, so a task knows nothing about optimizers.

The digits tasks reuse the main job's data split and MLP (`benchmarks/common/digits.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.model_selection import train_test_split

from benchmarks.common import digits as digits_lib
from benchmarks.common.digits import cross_entropy, he_normal

# Seeds of the fixed (task-defining, not run-varying) randomness: the quadratic's rotation, the
# language model's evaluation windows. Runs vary only through their own seed.
TASK_SEED = 1234


@dataclasses.dataclass(frozen=True)
class Task:
    """One training problem, independent of the optimizer.

    `loss(params, data, batch)` is what the optimizer sees the gradient of; `batch` is one step's
    slice of `batches(seed)`, whose leaves have a leading axis of `steps`. `evaluate(params,
    data)` returns the metrics recorded every `eval_every` steps; all are "lower is better"
    except those named in `higher_is_better`. The learning rate is chosen by the final values
    of the metrics in `select` (the first decides, the next breaks ties), each the mean of the
    last `final_window` evaluations. `plot_metrics` are the ones the task's figure shows.
    """

    name: str
    title: str
    family: str  # "neural" (a learning-rate grid around each method's default) or "landscape"
    steps: int
    eval_every: int
    data: Any
    init_params: Callable[[jax.Array], Any]
    batches: Callable[[int], Any]
    loss: Callable[[Any, Any, Any], jax.Array]
    evaluate: Callable[[Any, Any], dict[str, jax.Array]]
    select: tuple[str, ...]
    metric_labels: dict[str, str]
    plot_metrics: tuple[str, ...]
    higher_is_better: tuple[str, ...] = ()
    final_window: int = 1
    # The full training loss, (params, data) -> scalar, whose Hessian the study probes.
    hessian_loss: Callable[[Any, Any], jax.Array] | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The knobs that differ between the quick and the full study."""

    digits_steps: int
    digits_batch: int
    digits_subset: int | None  # train and test examples kept (each); None keeps the split whole
    cnn_channels: tuple[int, int]
    lm_steps: int
    lm_batch: int
    lm_layers: int
    lm_d_model: int
    lm_mlp_ratio: int
    lm_context: int
    lm_eval_windows: int
    lm_evals: int  # the language model's evaluations are forward passes of a transformer
    landscape_steps: int
    rosenbrock_steps: int
    evals: int  # evaluations per run, besides the one at step 0


FULL = Sizes(
    digits_steps=1500,
    digits_batch=64,
    digits_subset=None,
    cnn_channels=(16, 32),
    lm_steps=800,
    lm_batch=8,
    lm_layers=2,
    lm_d_model=64,
    # Half GPT's usual 4: most of the budget goes to this task, and the narrower MLP buys more
    # steps in the same time.
    lm_mlp_ratio=2,
    lm_context=64,
    lm_eval_windows=64,
    lm_evals=20,
    landscape_steps=1000,
    rosenbrock_steps=3000,
    evals=50,
)

QUICK = Sizes(
    digits_steps=40,
    digits_batch=32,
    digits_subset=128,
    cnn_channels=(4, 8),
    lm_steps=20,
    lm_batch=4,
    lm_layers=1,
    lm_d_model=16,
    lm_mlp_ratio=2,
    lm_context=16,
    lm_eval_windows=8,
    lm_evals=4,
    landscape_steps=40,
    rosenbrock_steps=40,
    evals=4,
)


def _eval_every(steps: int, evals: int) -> int:
    every = max(1, steps // evals)
    if steps % every:
        raise ValueError(f"{steps} steps are not a multiple of the evaluation interval {every}")
    return every


# --- Digits: the main job's MLP, and a small CNN -----------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DigitsData:
    x_train: jax.Array
    y_train: jax.Array
    x_val: jax.Array
    y_val: jax.Array
    x_test: jax.Array
    y_test: jax.Array


def load_digits_with_validation(subset: int | None = None) -> DigitsData:
    """The main job's split and scaling, with a fifth of its training images held out.

    The learning rate is chosen on the held-out fifth, so that the test set decides nothing.
    (The standardisation is the main job's, fit on all of its training images.)
    """
    digits = digits_lib.load_digits_dataset()
    x_train, x_val, y_train, y_val = train_test_split(
        np.asarray(digits.x_train),
        np.asarray(digits.y_train),
        test_size=0.2,
        random_state=0,
        stratify=np.asarray(digits.y_train),
    )
    data = DigitsData(
        x_train=jnp.asarray(x_train),
        y_train=jnp.asarray(y_train),
        x_val=jnp.asarray(x_val),
        y_val=jnp.asarray(y_val),
        x_test=digits.x_test,
        y_test=digits.y_test,
    )
    if subset is not None:
        # The quick mode's evaluations and Hessian products cost in proportion to the data.
        data = jax.tree.map(lambda a: a[:subset], data)
    return data


def _digits_metrics(logits_fn: Callable[[Any, jax.Array], jax.Array]):
    def evaluate(params: Any, data: DigitsData) -> dict[str, jax.Array]:
        metrics = {}
        for split in ("train", "val", "test"):
            logits = logits_fn(params, getattr(data, f"x_{split}"))
            labels = getattr(data, f"y_{split}")
            metrics[f"{split}_loss"] = cross_entropy(logits, labels)
            if split != "train":
                metrics[f"{split}_accuracy"] = jnp.mean(jnp.argmax(logits, -1) == labels)
        return metrics

    return evaluate


def _digits_task(name: str, title: str, logits_fn, init_params, sizes: Sizes) -> Task:
    data = load_digits_with_validation(sizes.digits_subset)
    num_train = data.x_train.shape[0]

    def loss(params, data, batch):
        return cross_entropy(logits_fn(params, data.x_train[batch]), data.y_train[batch])

    def full_train_loss(params, data):
        return cross_entropy(logits_fn(params, data.x_train), data.y_train)

    return Task(
        name=name,
        title=title,
        family="neural",
        steps=sizes.digits_steps,
        eval_every=_eval_every(sizes.digits_steps, sizes.evals),
        data=data,
        init_params=init_params,
        # The main job's shuffled epochs; the seed sets both the batch order and the initial
        # parameters, and every optimizer sees the same of each for the same seed.
        batches=lambda seed: digits_lib.minibatch_order(
            num_train, sizes.digits_batch, sizes.digits_steps, seed
        ),
        loss=loss,
        evaluate=_digits_metrics(logits_fn),
        # Accuracy first; validation cross-entropy breaks ties between equal accuracies.
        select=("val_accuracy", "val_loss"),
        metric_labels={
            "train_loss": "cross-entropy, full training set",
            "val_loss": "cross-entropy, validation set",
            "val_accuracy": "validation accuracy",
            "test_loss": "cross-entropy, test set",
            "test_accuracy": "test accuracy",
        },
        plot_metrics=("train_loss", "test_loss", "test_accuracy"),
        higher_is_better=("val_accuracy", "test_accuracy"),
        hessian_loss=full_train_loss,
        details={
            "train_examples": int(num_train),
            "validation_examples": int(data.x_val.shape[0]),
            "test_examples": int(data.x_test.shape[0]),
            "batch_size": sizes.digits_batch,
        },
    )


def digits_mlp(sizes: Sizes) -> Task:
    layer_sizes = digits_lib.mlp_sizes()
    task = _digits_task(
        "digits_mlp",
        f"digits, MLP {'-'.join(map(str, layer_sizes))}",
        digits_lib.mlp_logits,
        lambda key: digits_lib.init_mlp(key, layer_sizes),
        sizes,
    )
    task.details["layer_sizes"] = list(layer_sizes)
    return task


def _patches3x3(x: jax.Array, stride: int = 1) -> jax.Array:
    """(B, H, W, C) -> (B, H/stride, W/stride, 9C): 3x3 neighbourhoods, zero-padded ("SAME").

    Convolution as a matrix product keeps the kernels 2-D (so Adafactor factors them, as it
    does a reshaped convolution kernel) and batches efficiently under `vmap` on a CPU, where a
    convolution with a batch of kernels is far slower. Only the output positions are gathered.
    """
    h, w = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    shifted = [
        padded[:, i : i + h : stride, j : j + w : stride] for i in range(3) for j in range(3)
    ]
    return jnp.concatenate(shifted, axis=-1)


def init_cnn(key: jax.Array, channels: tuple[int, int]) -> dict[str, dict[str, jax.Array]]:
    """He-normal kernels and zero biases: conv 3x3 (1->c1), conv 3x3 stride 2 (c1->c2), dense."""
    c1, c2 = channels
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "conv1": {"w": he_normal(k1, 9, c1), "b": jnp.zeros((c1,), jnp.float32)},
        "conv2": {"w": he_normal(k2, 9 * c1, c2), "b": jnp.zeros((c2,), jnp.float32)},
        "dense": {"w": he_normal(k3, 16 * c2, 10), "b": jnp.zeros((10,), jnp.float32)},
    }


def cnn_logits(params: dict[str, dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], 8, 8, 1)
    x = jax.nn.relu(_patches3x3(x) @ params["conv1"]["w"] + params["conv1"]["b"])  # 8x8xc1
    x = _patches3x3(x, stride=2)  # 4x4 positions
    x = jax.nn.relu(x @ params["conv2"]["w"] + params["conv2"]["b"])  # 4x4xc2
    return x.reshape(x.shape[0], -1) @ params["dense"]["w"] + params["dense"]["b"]


def digits_cnn(sizes: Sizes) -> Task:
    c1, c2 = sizes.cnn_channels
    task = _digits_task(
        "digits_cnn",
        f"digits, CNN conv3x3({c1})-conv3x3/2({c2})-dense",
        cnn_logits,
        lambda key: init_cnn(key, sizes.cnn_channels),
        sizes,
    )
    task.details["channels"] = [c1, c2]
    return task


# --- Character-level language model on the Python language reference --------------------------


def load_corpus() -> tuple[str, str]:
    """The text of `pydoc_data.topics`, the language-reference pages `help()` shows offline.

    Part of every CPython installation; the topics are joined in sorted order, so the corpus
    depends only on the Python version (its SHA-256 is recorded with the results).
    """
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    return text, hashlib.sha256(text.encode()).hexdigest()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TextData:
    train: jax.Array  # int32 symbol ids
    val: jax.Array
    train_eval_starts: jax.Array  # fixed windows on which the training loss is measured
    val_eval_starts: jax.Array


def _layer_norm(x: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def init_transformer(
    key: jax.Array, vocab: int, d_model: int, layers: int, context: int, mlp_ratio: int
) -> dict[str, Any]:
    """GPT-2-style initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 layers)."""
    keys = iter(jax.random.split(key, 3 + 4 * layers))

    def normal(shape, std=0.02):
        return jax.random.normal(next(keys), shape, jnp.float32) * std

    def norm():
        return {"scale": jnp.ones((d_model,)), "bias": jnp.zeros((d_model,))}

    residual_std = 0.02 / math.sqrt(2 * layers)
    return {
        "embed": normal((vocab, d_model)),
        "position": normal((context, d_model)),
        "blocks": [
            {
                "norm1": norm(),
                "qkv": normal((d_model, 3 * d_model)),
                "attn_out": normal((d_model, d_model), residual_std),
                "norm2": norm(),
                "mlp_in": normal((d_model, mlp_ratio * d_model)),
                "mlp_in_bias": jnp.zeros((mlp_ratio * d_model,)),
                "mlp_out": normal((mlp_ratio * d_model, d_model), residual_std),
            }
            for _ in range(layers)
        ],
        "final_norm": norm(),
        "unembed": normal((d_model, vocab)),
    }


def transformer_logits(params: dict[str, Any], tokens: jax.Array, heads: int) -> jax.Array:
    """Pre-LayerNorm causal transformer; tokens (B, T) -> logits (B, T, vocab)."""
    batch, length = tokens.shape
    d_model = params["embed"].shape[1]
    head_dim = d_model // heads
    x = params["embed"][tokens] + params["position"][:length]
    causal = jnp.tril(jnp.ones((length, length), bool))
    for block in params["blocks"]:
        qkv = (_layer_norm(x, block["norm1"]) @ block["qkv"]).reshape(
            batch, length, 3, heads, head_dim
        )
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        attention = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", attention, v).reshape(batch, length, d_model)
        x = x + mixed @ block["attn_out"]
        hidden = jax.nn.gelu(
            _layer_norm(x, block["norm2"]) @ block["mlp_in"] + block["mlp_in_bias"]
        )
        x = x + hidden @ block["mlp_out"]
    return _layer_norm(x, params["final_norm"]) @ params["unembed"]


def char_transformer(sizes: Sizes) -> Task:
    text, digest = load_corpus()
    symbols = sorted(set(text))
    ids = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    lookup = {ord(s): i for i, s in enumerate(symbols)}
    ids = np.array([lookup[c] for c in ids.tolist()], np.int32)
    # Every tenth block of 4096 characters is held out, so that validation text is spread over
    # all topics rather than being the alphabetically last ones.
    block = 4096
    blocks = [ids[i : i + block] for i in range(0, len(ids), block)]
    train = np.concatenate([b for i, b in enumerate(blocks) if i % 10 != 9])
    val = np.concatenate([b for i, b in enumerate(blocks) if i % 10 == 9])
    window = sizes.lm_context + 1
    rng = np.random.default_rng(TASK_SEED)
    data = TextData(
        train=jnp.asarray(train),
        val=jnp.asarray(val),
        train_eval_starts=jnp.asarray(
            np.sort(rng.integers(0, len(train) - window, sizes.lm_eval_windows)), jnp.int32
        ),
        # Evenly spaced over the whole validation text.
        val_eval_starts=jnp.asarray(
            np.linspace(0, len(val) - window, sizes.lm_eval_windows).astype(np.int32)
        ),
    )
    heads = max(1, sizes.lm_d_model // 16)
    offsets = jnp.arange(window)

    def mean_loss(params, stream, starts):
        windows = stream[starts[:, None] + offsets]
        logits = transformer_logits(params, windows[:, :-1], heads)
        return cross_entropy(logits, windows[:, 1:])

    def batches(seed: int) -> np.ndarray:
        # Window starts drawn uniformly over the training text, independently per step.
        rng = np.random.default_rng(seed)
        return rng.integers(0, len(train) - window, (sizes.lm_steps, sizes.lm_batch)).astype(
            np.int32
        )

    def evaluate(params, data):
        return {
            "train_loss": mean_loss(params, data.train, data.train_eval_starts),
            "val_loss": mean_loss(params, data.val, data.val_eval_starts),
        }

    return Task(
        name="char_transformer",
        title=(
            f"character LM, transformer {sizes.lm_layers}x{sizes.lm_d_model} "
            f"(context {sizes.lm_context}, vocab {len(symbols)})"
        ),
        family="neural",
        steps=sizes.lm_steps,
        eval_every=_eval_every(sizes.lm_steps, sizes.lm_evals),
        data=data,
        init_params=lambda key: init_transformer(
            key,
            len(symbols),
            sizes.lm_d_model,
            sizes.lm_layers,
            sizes.lm_context,
            sizes.lm_mlp_ratio,
        ),
        batches=batches,
        loss=lambda params, data, starts: mean_loss(params, data.train, starts),
        evaluate=evaluate,
        select=("val_loss",),
        metric_labels={
            "train_loss": "cross-entropy (nats/char), fixed training windows",
            "val_loss": "cross-entropy (nats/char), validation windows",
        },
        plot_metrics=("train_loss", "val_loss"),
        details={
            "corpus": "pydoc_data.topics (CPython's offline language reference), sorted by topic",
            "corpus_chars": len(text),
            "corpus_sha256": digest,
            "vocab": len(symbols),
            "train_chars": int(len(train)),
            "val_chars": int(len(val)),
            "batch_size": sizes.lm_batch,
            "context": sizes.lm_context,
            "d_model": sizes.lm_d_model,
            "mlp_hidden": sizes.lm_mlp_ratio * sizes.lm_d_model,
            "layers": sizes.lm_layers,
            "heads": heads,
            "eval_windows": sizes.lm_eval_windows,
        },
    )


# --- Deterministic and noisy landscapes --------------------------------------------------------

QUADRATIC_DIM = 50
QUADRATIC_CONDITION = 1e4
NOISY_DIM = 50
NOISY_CONDITION = 1e2
NOISE_SCALE = 1.0


def _no_batches(steps: int) -> Callable[[int], np.ndarray]:
    return lambda seed: np.zeros((steps, 1), np.float32)


def quadratic(sizes: Sizes) -> Task:
    """f(x) = x^T Q diag(lambda) Q^T x / 2, lambda log-spaced over [1/condition, 1], Q random.

    The rotation matters: on an axis-aligned quadratic any per-coordinate preconditioner would
    undo the ill-conditioning exactly.
    """
    q, _ = np.linalg.qr(np.random.default_rng(TASK_SEED).normal(size=(QUADRATIC_DIM,) * 2))
    eigenvalues = np.logspace(-math.log10(QUADRATIC_CONDITION), 0.0, QUADRATIC_DIM)
    hessian = jnp.asarray((q * eigenvalues) @ q.T, jnp.float32)

    def value(x, hessian):
        return 0.5 * x @ hessian @ x

    return Task(
        name="quadratic",
        title=f"ill-conditioned quadratic (dim {QUADRATIC_DIM}, condition {QUADRATIC_CONDITION:g})",
        family="landscape",
        steps=sizes.landscape_steps,
        eval_every=_eval_every(sizes.landscape_steps, sizes.evals),
        data=hessian,
        init_params=lambda key: jax.random.normal(key, (QUADRATIC_DIM,), jnp.float32),
        batches=_no_batches(sizes.landscape_steps),
        loss=lambda x, hessian, _: value(x, hessian),
        evaluate=lambda x, hessian: {"loss": value(x, hessian)},
        select=("loss",),
        metric_labels={"loss": "f(x) - f*"},
        plot_metrics=("loss",),
        details={"dim": QUADRATIC_DIM, "condition": QUADRATIC_CONDITION, "start": "N(0, I)"},
    )


def rosenbrock(sizes: Sizes) -> Task:
    """f(x, y) = (1 - x)^2 + 100 (y - x^2)^2 from (-1.2, 1) plus N(0, 0.1^2) per seed."""

    def value(p):
        return jnp.square(1.0 - p[0]) + 100.0 * jnp.square(p[1] - p[0] ** 2)

    start = jnp.array([-1.2, 1.0], jnp.float32)
    return Task(
        name="rosenbrock",
        title="Rosenbrock (2-D)",
        family="landscape",
        steps=sizes.rosenbrock_steps,
        eval_every=_eval_every(sizes.rosenbrock_steps, sizes.evals),
        data=(),
        init_params=lambda key: start + 0.1 * jax.random.normal(key, (2,), jnp.float32),
        batches=_no_batches(sizes.rosenbrock_steps),
        loss=lambda p, data, _: value(p),
        evaluate=lambda p, data: {"loss": value(p)},
        select=("loss",),
        metric_labels={"loss": "f(x) - f*"},
        plot_metrics=("loss",),
        details={"start": "(-1.2, 1) + N(0, 0.1^2 I)", "minimum": [1.0, 1.0]},
    )


def noisy_quadratic(sizes: Sizes) -> Task:
    """f(x) = sum(h x^2) / 2 with gradients h x + s sqrt(h) xi, xi ~ N(0, I): variance s^2 h.

    The noise model of the noisy quadratic model (gradient covariance proportional to the
    curvature, as for minibatch gradients near a minimum). The metric is the exact f, averaged
    over the last tenth of the evaluations, i.e. an estimate of the loss the run settles at.
    """
    curvature = jnp.asarray(np.logspace(-math.log10(NOISY_CONDITION), 0.0, NOISY_DIM), jnp.float32)

    def batches(seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed + 10_000)  # independent of the seed's starting point
        return rng.standard_normal((sizes.landscape_steps, NOISY_DIM)).astype(np.float32)

    def value(x, h):
        return 0.5 * jnp.sum(h * x * x)

    # The linear term's gradient is exactly the noise, so `jax.grad` of this loss gives the
    # stochastic gradient, while its value at the noise-free point is f.
    def stochastic_loss(x, h, xi):
        return value(x, h) + NOISE_SCALE * jnp.sum(jnp.sqrt(h) * xi * x)

    return Task(
        name="noisy_quadratic",
        title=(
            f"noisy quadratic (dim {NOISY_DIM}, condition {NOISY_CONDITION:g}, "
            f"gradient noise variance {NOISE_SCALE:g}^2 h)"
        ),
        family="landscape",
        steps=sizes.landscape_steps,
        eval_every=_eval_every(sizes.landscape_steps, sizes.evals),
        data=curvature,
        init_params=lambda key: jax.random.normal(key, (NOISY_DIM,), jnp.float32),
        batches=batches,
        loss=stochastic_loss,
        evaluate=lambda x, h: {"loss": value(x, h)},
        select=("loss",),
        metric_labels={"loss": "f(x) - f* (exact)"},
        plot_metrics=("loss",),
        final_window=max(1, sizes.evals // 10),
        details={
            "dim": NOISY_DIM,
            "condition": NOISY_CONDITION,
            "noise_scale": NOISE_SCALE,
            "start": "N(0, I)",
        },
    )


TASK_BUILDERS: dict[str, Callable[[Sizes], Task]] = {
    "digits_mlp": digits_mlp,
    "digits_cnn": digits_cnn,
    "char_transformer": char_transformer,
    "quadratic": quadratic,
    "rosenbrock": rosenbrock,
    "noisy_quadratic": noisy_quadratic,
}
