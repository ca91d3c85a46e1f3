"""A small CNN on scikit-learn's digits, with torch's BatchNorm2d and with bnkernels'.

Data: ``sklearn.datasets.load_digits`` (1797 grey 8x8 images of the digits
0-9, pixel values 0-16, scaled to 0-1), split 75/25 (stratified, seeded)
into training and test sets.

Model: ``Conv(1->16, 3x3) - BN - ReLU - Conv(16->32, 3x3) - BN - ReLU -
MaxPool(2) - Linear(512->10)``, cross-entropy loss, SGD with momentum.

It is trained twice from the same initial weights, on the same batches in
the same order: once as built (``torch.nn.BatchNorm2d``), once after
``bnkernels.torch.convert(model)`` (every ``BatchNorm*d`` replaced by
bnkernels' drop-in, parameters and buffers kept). The two loss curves must
agree within float32 noise; the example prints their largest difference
(absolute, and relative to the loss), the mean time of a training step
(forward, loss, backward and optimizer step, timed with
``time.perf_counter`` after a warm-up of a few steps; the runs go in
lockstep, each batch to each model in turn, so that other load on the
machine weighs on all alike; one thread by default, ``--threads``), the test accuracy
(inference mode: running statistics) and writes ``digits_cnn.png``.
``--channels-last``: both also in ``torch.channels_last`` memory format
(model and batches).

On float32 noise: bnkernels' float32 batch norm rounds differently from
torch's (on the CPU, closer to float64: ~1e-7 relative against torch's
~1e-6), so each step's loss and gradients differ by ~1e-6 relative.
Training amplifies such differences more or less depending on how hard it
is driven: at the default SGD lr 0.01 (momentum 0.9) the loss curves stay
within ~1e-5 relative over the run; at lr 0.05 they part to ~1e-2 after
some 40 steps, as a one-ulp perturbation of the initial weights makes
torch part from itself. ``--dtype float64`` takes the rounding out: the
curves then agree to ~1e-14.

    python examples/digits_cnn.py [--quick] [--channels-last] [--out DIR]

Needs torch and scikit-learn (``pip install torch scikit-learn``).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import numpy as np
import torch
from torch import nn

from bnkernels.torch import convert

WARMUP = 5  # steps left out of the mean step time


def load_data(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)
    return (torch.from_numpy(x_train), torch.from_numpy(y_train), torch.from_numpy(x_test),
            torch.from_numpy(y_test))


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


def _set_threads(n: int) -> None:
    """torch's intra-op threads, and numba's (bnkernels' CPU backend) where numba is loaded. (Again after
    the first numba kernel: its threading layer's start-up resets torch's count to the CPU count.)"""
    torch.set_num_threads(n)
    numba = sys.modules.get("numba")
    if numba is not None:
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def train(runs: dict, data, batches, lr: float, threads: int) -> dict:
    """Train every model of ``runs`` (name: (model, dtype, memory format)) on ``batches`` (index arrays),
    in lockstep: each batch goes to each model in turn, so that whatever else loads the machine loads all
    alike. Returns per name the loss of every step, the mean step time after ``WARMUP`` steps (forward,
    loss, backward, optimizer step), and the test loss and accuracy (inference mode)."""
    x_train, y_train, x_test, y_test = data
    loss_fn = nn.CrossEntropyLoss()
    state = {}
    for name, (model, dtype, fmt) in runs.items():
        model = model.to(memory_format=fmt).train()
        state[name] = (model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), [], [])
    for step, idx in enumerate(batches):
        for name, (model, dtype, fmt) in runs.items():
            model, opt, losses, times = state[name]
            xb = x_train[idx].to(dtype).contiguous(memory_format=fmt)
            yb = y_train[idx]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
        if step == 0:
            _set_threads(threads)
    results = {}
    for name, (model, dtype, fmt) in runs.items():
        model, opt, losses, times = state[name]
        model.eval()
        with torch.no_grad():
            logits = model(x_test.to(dtype).contiguous(memory_format=fmt))
            test_loss = loss_fn(logits, y_test).item()
            accuracy = (logits.argmax(1) == y_test).double().mean().item()
        results[name] = {"losses": np.array(losses), "step_ms": 1e3 * np.mean(times[WARMUP:]),
                         "test_loss": test_loss, "accuracy": accuracy, "model": model}
    return results


def plot(results: dict, pairs, reference, steps_per_epoch: int, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, axd) = plt.subplots(2, 1, figsize=(9, 8), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    styles = {"torch": dict(lw=2.5, alpha=0.5), "bnkernels": dict(lw=1.0, ls="--")}
    for name, r in results.items():
        impl = name.split()[0]
        ax.plot(np.arange(1, len(r["losses"]) + 1), r["losses"],
                label=f"{name}: {r['step_ms']:.2f} ms/step, test accuracy {100 * r['accuracy']:.1f}%",
                **styles[impl])
    ax.set_yscale("log")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title("Digits CNN (conv-BN-ReLU x2, pool, linear), SGD: torch.nn.BatchNorm2d vs bnkernels.torch\n"
                 "same initial weights, same batches")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for fmt, (a, b) in pairs.items():
        la, lb = results[a]["losses"], results[b]["losses"]
        axd.plot(np.arange(1, len(la) + 1), np.maximum(np.abs(la - lb), 1e-12),
                 label=f"|{b} - {a}|, {fmt}: max {np.max(np.abs(la - lb)):.1e}")
    if reference is not None:
        for name, colour in (("torch NCHW", "black"), ("bnkernels NCHW", "tab:red")):
            la = results[name]["losses"]
            axd.plot(np.arange(1, len(la) + 1), np.maximum(np.abs(la - reference), 1e-12), lw=0.9, ls=":",
                     color=colour,
                     label=f"|{name} - torch float64| (float32 noise): max {np.max(np.abs(la - reference)):.1e}")
    axd.set_yscale("log")
    axd.set_ylim(1e-12, 1)
    axd.set_xlabel(f"SGD step ({steps_per_epoch} per epoch)")
    axd.set_ylabel("|difference of the losses|")
    axd.grid(alpha=0.3)
    axd.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny settings (the test's): 2 epochs")
    ap.add_argument("--out", default=os.path.join("docs", "images"), help="folder of digits_cnn.png")
    ap.add_argument("--epochs", type=int, default=None, help="default 10 (--quick: 2)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--threads", type=int, default=1, help="torch's and numba's threads (default 1: steadier timings)")
    ap.add_argument("--backend", default="auto", help="bnkernels backend, convert(model, backend=...)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--channels-last", action="store_true", help="also train both in torch.channels_last")
    args = ap.parse_args(argv)
    epochs = args.epochs or (2 if args.quick else 10)
    _set_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    data = load_data(args.seed)
    n_train = len(data[0])
    order = np.random.default_rng(args.seed + 1)
    batches = [perm[i:i + args.batch] for _ in range(epochs) for perm in [order.permutation(n_train)]
               for i in range(0, n_train - args.batch + 1, args.batch)]  # (full batches only)
    steps_per_epoch = len(batches) // epochs
    base = make_model(args.seed).to(dtype)

    formats = {"NCHW": torch.contiguous_format}
    if args.channels_last:
        formats["channels_last"] = torch.channels_last
    runs, pairs = {}, {}
    for fmt, memory_format in formats.items():
        a, b = f"torch {fmt}", f"bnkernels {fmt}"
        runs[a] = (copy.deepcopy(base), dtype, memory_format)
        runs[b] = (convert(copy.deepcopy(base), backend=args.backend), dtype, memory_format)
        pairs[fmt] = (a, b)
    if dtype == torch.float32:  # the yardstick of float32 noise: torch in float64, same weights, same batches
        runs["reference"] = (copy.deepcopy(base).double(), torch.float64, torch.contiguous_format)
    results = train(runs, data, batches, args.lr, args.threads)
    reference = results.pop("reference")["losses"] if "reference" in results else None

    converted = results[pairs["NCHW"][1]]["model"]
    print(f"digits_cnn: {n_train} training / {len(data[2])} test images, {epochs} epochs of {steps_per_epoch} "
          f"steps (batch {args.batch}), SGD lr {args.lr} momentum 0.9, {args.dtype}, seed {args.seed}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), bnkernels backend {args.backend!r}")
    print("BN layers after convert: " + ", ".join(sorted({f"{type(m).__module__}.{type(m).__name__}"
                                                           for m in converted.modules() if "BatchNorm" in
                                                           type(m).__name__})))
    print(f"{'run':<24} {'first loss':>10} {'final loss':>10} {'test loss':>9} {'test acc':>8} {'ms/step':>8}")
    for name, r in results.items():
        print(f"{name:<24} {r['losses'][0]:10.6f} {r['losses'][-1]:10.6f} {r['test_loss']:9.5f} "
              f"{100 * r['accuracy']:7.2f}% {r['step_ms']:8.3f}")
    for fmt, (a, b) in pairs.items():
        la, lb = results[a]["losses"], results[b]["losses"]
        pa = dict(results[a]["model"].named_parameters())
        pmax = max(float((p.detach() - pa[k].detach()).abs().max()) for k, p in results[b]["model"].named_parameters())
        print(f"loss curves {fmt}: max abs diff {np.max(np.abs(la - lb)):.3e}, max rel diff "
              f"{np.max(np.abs(la - lb) / np.abs(la)):.3e} over {len(la)} steps; final weights max abs diff "
              f"{pmax:.3e}; step time bnkernels/torch {results[b]['step_ms'] / results[a]['step_ms']:.2f}x")
    if reference is not None:
        print("float32 noise, each run's loss curve against torch's in float64 (NCHW): max rel diff " + ", ".join(
            f"{name} {np.max(np.abs(r['losses'] - reference) / reference):.3e}" for name, r in results.items()))

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "digits_cnn.png")
    plot(results, pairs, reference, steps_per_epoch, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
