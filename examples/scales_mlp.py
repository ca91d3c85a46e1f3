"""Two features on wildly different scales, with and without batch norm.

The documents' own example: "if I had 2 metrics for my inputs: miles driven
and age, miles driven can range from 0 to 100,000, and age can range from 0
to 100 [...] we just squish the metrics down [...] so they are the 'same' in
the network's eyes."

Data (synthetic, seeded): ``miles`` uniform on [0, 100000], ``age`` uniform
on [0, 100], and a regression target, a made-up yearly premium in $1000::

    premium = 0.5 + miles / 100000 + 2 * ((age - 45) / 55) ** 2 + noise,  noise ~ N(0, 0.05**2)

(linear in the miles, U-shaped in the age, so the network needs both
features and its hidden layers). Its variance, the loss of always
predicting the mean, is printed as the baseline.

Both networks get the *raw* features and are a NumPy MLP written out by
hand (forward, backward, plain SGD on the mean squared error), 2-32-32-1
with ReLU, the same initial weights and the same batches:

* without BN: ``Linear - ReLU - Linear - ReLU - Linear``;
* with BN: ``BN - Linear - BN - ReLU - Linear - BN - ReLU - Linear``, each
  ``BN`` a :class:`bnkernels.BatchNorm` in training mode (its ``backward``
  gives dx and stores ``grad_gamma``/``grad_beta``, which SGD applies). The
  first one normalizes the two input features over the batch: the
  "squishing" of the documents.

Each is trained at learning rates 1e-12, 1e-10, ..., 1e-2, 1e-1, 1 (one
panel each; the last panel: final loss against learning rate). A run whose
loss becomes non-finite or exceeds 10,000 times its first step's (and 1)
is stopped there and marked diverged (its curve ends at a cross; the
legend gives the step).

Prints, for each learning rate and network, the final training loss (mean
of the last 10% of the steps) and the test mean squared error (inference
mode: the BN layers use their running statistics), then the best of each.

    python examples/scales_mlp.py [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from bnkernels import BatchNorm

LEARNING_RATES = (1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2, 1e-1, 1.0)
HIDDEN = 32
DIVERGED = 1e4  # a loss above this many times the first step's (or not finite) stops the run


def make_data(n: int, rng: np.random.Generator):
    """``(x, y)``: x of shape (n, 2), raw miles and age; y of shape (n, 1)."""
    miles = rng.uniform(0.0, 100_000.0, n)
    age = rng.uniform(0.0, 100.0, n)
    premium = 0.5 + miles / 100_000.0 + 2.0 * ((age - 45.0) / 55.0) ** 2 + rng.normal(0.0, 0.05, n)
    return np.stack([miles, age], axis=1), premium[:, None]


def init_weights(rng: np.random.Generator) -> dict:
    """He-initialized weights of the 2-32-32-1 MLP (both networks start from these)."""
    sizes = [(2, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, 1)]
    w = {}
    for i, (fan_in, fan_out) in enumerate(sizes, 1):
        w[f"W{i}"] = rng.normal(0.0, np.sqrt(2.0 / fan_in), (fan_in, fan_out))
        w[f"b{i}"] = np.zeros(fan_out)
    return w


class MLP:
    """The MLP, with (``bn=True``) or without batch norm, forward and backward by hand."""

    def __init__(self, weights: dict, bn: bool, backend: str):
        self.p = {k: v.copy() for k, v in weights.items()}
        self.bn = [BatchNorm(c, dtype=np.float64, backend=backend) for c in (2, HIDDEN, HIDDEN)] if bn else None

    def train(self, mode: bool = True):
        for layer in self.bn or ():
            layer.train(mode)

    def forward(self, x):
        p, bn = self.p, self.bn
        h0 = bn[0].forward(x) if bn else x
        z1 = h0 @ p["W1"] + p["b1"]
        a1 = np.maximum(bn[1].forward(z1) if bn else z1, 0.0)
        z2 = a1 @ p["W2"] + p["b2"]
        a2 = np.maximum(bn[2].forward(z2) if bn else z2, 0.0)
        self._cache = (h0, a1, a2)
        return a2 @ p["W3"] + p["b3"]

    def backward(self, dout) -> dict:
        """Gradients of every parameter (BN's gamma and beta as ``bn{i}.gamma``/``.beta``)."""
        p, bn = self.p, self.bn
        h0, a1, a2 = self._cache
        g = {"W3": a2.T @ dout, "b3": dout.sum(0)}
        da2 = (dout @ p["W3"].T) * (a2 > 0)
        dz2 = bn[2].backward(da2) if bn else da2
        g["W2"], g["b2"] = a1.T @ dz2, dz2.sum(0)
        da1 = (dz2 @ p["W2"].T) * (a1 > 0)
        dz1 = bn[1].backward(da1) if bn else da1
        g["W1"], g["b1"] = h0.T @ dz1, dz1.sum(0)
        if bn:
            bn[0].backward(dz1 @ p["W1"].T)  # (dx itself unused: the inputs are data)
            for i, layer in enumerate(bn):
                g[f"bn{i}.gamma"], g[f"bn{i}.beta"] = layer.grad_gamma, layer.grad_beta
        return g

    def sgd_step(self, grads: dict, lr: float) -> None:
        for k, gk in grads.items():
            if k.startswith("bn"):
                layer = self.bn[int(k[2])]
                param = layer.gamma if k.endswith("gamma") else layer.beta
                param -= lr * gk
            else:
                self.p[k] -= lr * gk


def train(model: MLP, x, y, lr: float, steps: int, batch: int, seed: int):
    """Plain SGD on the MSE; returns (losses per step, step it diverged at or None)."""
    order = np.random.default_rng(seed)  # the same batches for every run
    losses = []
    with np.errstate(over="ignore", invalid="ignore"):
        for step in range(steps):
            idx = order.integers(0, len(x), batch)
            out = model.forward(x[idx])
            err = out - y[idx]
            loss = float(np.mean(err ** 2))
            diverged = not np.isfinite(loss) or (len(losses) > 0 and loss > DIVERGED * max(losses[0], 1.0))
            losses.append(loss if np.isfinite(loss) else np.inf)
            if diverged:  # (the last loss is the one that stopped it)
                return np.array(losses), step
            model.sgd_step(model.backward(2.0 * err / batch), lr)
    return np.array(losses), None


def evaluate(model: MLP, x, y) -> float:
    model.train(False)
    with np.errstate(over="ignore", invalid="ignore"):
        mse = float(np.mean((model.forward(x) - y) ** 2))
    model.train(True)
    return mse


def plot(results, baseline: float, steps: int, tail: int, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = 1e14  # the y range of the panels (the raw-feature network starts near 1e9)
    fig, axs = plt.subplots(3, 3, figsize=(14, 11), sharey=True)
    colours = {False: "tab:red", True: "tab:blue"}
    names = {False: "without BN", True: "with BN"}
    for ax, lr in zip(axs.flat, LEARNING_RATES):
        for bn in (False, True):
            losses, diverged, _ = results[lr, bn]
            label = f"{names[bn]}: diverged at step {diverged} (x)" if diverged is not None else names[bn]
            shown = np.minimum(losses, top / 10)  # (clipped: a diverged run's last loss may be inf)
            ax.plot(np.arange(len(losses)), shown, color=colours[bn], lw=1.2, label=label)
            if diverged is not None:  # a cross where the run was stopped
                ax.plot([len(losses) - 1], [shown[-1]], "x", color=colours[bn], ms=11, mew=2.5)
        ax.axhline(baseline, color="grey", ls="--", lw=1, label="predicting the mean")
        ax.set_title(f"learning rate {lr:g}")
        ax.set_yscale("log")
        ax.set_ylim(1e-3, top)
        ax.set_xlim(0, steps)
        ax.set_xlabel("SGD step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    for ax in axs[:, 0]:
        ax.set_ylabel("training loss (MSE)")
    ax = axs.flat[len(LEARNING_RATES)]  # the summary: final loss against the learning rate
    for bn in (False, True):
        lrs = [lr for lr in LEARNING_RATES if results[lr, bn][1] is None]
        ax.plot(lrs, [results[lr, bn][0][-tail:].mean() for lr in lrs], "o-", color=colours[bn], label=names[bn])
        gone = [lr for lr in LEARNING_RATES if results[lr, bn][1] is not None]
        ax.plot(gone, [top / 10] * len(gone), "x", color=colours[bn], ms=11, mew=2.5,
                label=f"{names[bn]}: diverged" if gone else None)
    ax.axhline(baseline, color="grey", ls="--", lw=1, label="predicting the mean")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_title(f"final loss (mean of the last {tail} steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    for ax in axs.flat[len(LEARNING_RATES) + 1:]:
        ax.set_visible(False)
    fig.suptitle("Raw features, miles driven (0-100,000) and age (0-100): a 2-32-32-1 MLP trained by plain SGD,\n"
                 "without batch norm and with bnkernels.BatchNorm (on the inputs and after each hidden layer)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny settings (the test's): fewer steps, less data")
    ap.add_argument("--out", default=os.path.join("docs", "images"), help="folder of scales_mlp.png")
    ap.add_argument("--steps", type=int, default=None, help="SGD steps per run (default 1000; --quick 150)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="numpy", help="bnkernels backend of the BN layers (default numpy)")
    args = ap.parse_args(argv)
    steps = args.steps or (150 if args.quick else 1000)
    n_train, n_test, batch = (1024, 512, 64) if args.quick else (8192, 2048, 64)

    rng = np.random.default_rng(args.seed)
    x, y = make_data(n_train, rng)
    x_test, y_test = make_data(n_test, rng)
    weights = init_weights(rng)
    baseline = float(np.var(y_test))
    tail = max(1, steps // 10)

    t0 = time.perf_counter()
    results = {}
    for lr in LEARNING_RATES:
        for bn in (False, True):
            model = MLP(weights, bn, args.backend)
            losses, diverged = train(model, x, y, lr, steps, batch, seed=args.seed + 1)
            test = evaluate(model, x_test, y_test) if diverged is None else float("nan")
            results[lr, bn] = (losses, diverged, test)

    print(f"scales_mlp: {steps} SGD steps of batch {batch}, {n_train} training / {n_test} test samples, "
          f"seed {args.seed}, BN backend {args.backend!r}")
    print(f"baseline (variance of the test target, the MSE of predicting its mean): {baseline:.4f}")
    print(f"final loss = mean training MSE of the last {tail} steps; test = MSE on the test set "
          f"(inference mode)")
    print(f"{'lr':>7} | {'without BN: final':>17} {'test':>10} | {'with BN: final':>17} {'test':>10}")

    def cells(lr, bn):
        losses, diverged, test = results[lr, bn]
        if diverged is not None:
            return f"{'diverged @' + str(diverged):>17} {'-':>10}"
        return f"{losses[-tail:].mean():17.4e} {test:10.4e}"

    for lr in LEARNING_RATES:
        print(f"{lr:7.0e} | {cells(lr, False)} | {cells(lr, True)}")
    for bn in (False, True):
        finals = {lr: results[lr, bn][0][-tail:].mean() for lr in LEARNING_RATES if results[lr, bn][1] is None}
        name = "with BN" if bn else "without BN"
        if finals:
            lr = min(finals, key=finals.get)
            print(f"best {name}: final loss {finals[lr]:.4e} at lr {lr:g}, test {results[lr, bn][2]:.4e}; "
                  f"trains (no divergence) at lr {min(finals):g} .. {max(finals):g}")
        else:
            print(f"best {name}: none (diverged at every learning rate)")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "scales_mlp.png")
    plot(results, baseline, steps, tail, path)
    print(f"wrote {path} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
