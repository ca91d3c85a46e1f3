"""One rank of the 2-process job of ``tests/test_torch_sync.py``, started by
``torch.distributed.run`` (gloo, CPU):
``torch_sync_worker.py CASES_DIR OUT_DIR``.

``CASES_DIR/cases.json`` lists the cases and ``CASES_DIR/<name>.npz`` holds
each case's global batch (``x<step>``, ``dy<step>``, ``xeval``) and
parameters; this rank takes its slice (``counts[rank]`` samples after the
lower ranks'), runs ``bnkernels.torch.SyncBatchNorm`` on it and writes
``OUT_DIR/<name>_rank<r>.npz``: per step ``y``, ``dx``, the parameter
gradients summed over the ranks (as data-parallel training does), the
running statistics and ``num_batches_tracked``; or ``error``, the
exception's type and message. The test compares them with one process
holding the whole batch. Every rank runs every case, in the same order,
whatever fails (an exception of one case is recorded, not raised).
"""
import json
import sys
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import bnkernels
from bnkernels.torch import SyncBatchNorm, sync

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _slice(a, counts, rank):
    start = sum(counts[:rank])
    return torch.from_numpy(np.ascontiguousarray(a[start:start + counts[rank]]))


def _summed(grad):
    """A parameter gradient summed over the ranks (what DDP does, without
    its 1 / world size)."""
    total = grad.detach().clone()
    dist.all_reduce(total)
    return total.numpy()


def _layer(case, data, rank, group=None):
    """Training steps on this rank's slice, then (rank 0 alone) eval."""
    spec, counts = case, case["counts"]
    dtype = DTYPES[spec.get("dtypes", [spec["dtype"]] * 2)[rank]]
    C = spec.get("channels", [spec["C"]] * 2)[rank]
    m = SyncBatchNorm(C, process_group=group, dtype=dtype, **spec["options"])
    with torch.no_grad():
        for name in ("weight", "bias"):
            if getattr(m, name) is not None:
                getattr(m, name).copy_(torch.from_numpy(data[name][:C]))
    fmt = torch.channels_last if spec["channels_last"] else torch.contiguous_format
    out = {}
    for step in range(spec["steps"]):
        x = _slice(data[f"x{step}"], counts, rank)[:, :C].to(dtype).contiguous(memory_format=fmt)
        x.requires_grad_()
        dy = _slice(data[f"dy{step}"], counts, rank)[:, :C].to(dtype).contiguous(memory_format=fmt)
        y = m(x)
        (y * dy).sum().backward()
        out[f"y{step}"], out[f"dx{step}"] = y.detach().numpy(), x.grad.numpy()
        out[f"kept_format{step}"] = np.array(y.is_contiguous(memory_format=fmt) and x.grad.is_contiguous(
            memory_format=fmt))
        for key, p in (("dw", m.weight), ("db", m.bias)):
            if p is not None:
                out[f"{key}{step}"] = _summed(p.grad)
        m.zero_grad()
        if m.track_running_stats:
            out[f"rm{step}"], out[f"rv{step}"] = m.running_mean.numpy().copy(), m.running_var.numpy().copy()
            out[f"nbt{step}"] = m.num_batches_tracked.numpy().copy()
    if spec.get("eval") and rank == 0:  # eval makes no collective: rank 0 validates alone
        m.eval()
        out["yeval"] = m(torch.from_numpy(data["xeval"]).to(dtype).contiguous(memory_format=fmt)).detach().numpy()
    return out


def _model(case, data, rank):
    """A small conv net converted by ``convert_sync_batchnorm``: one step."""
    torch.manual_seed(case["seed"])
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 3, 1), torch.nn.BatchNorm2d(3, momentum=None)).double()
    net = SyncBatchNorm.convert_sync_batchnorm(net)
    assert [type(net[i]) for i in (1, 4)] == [SyncBatchNorm] * 2
    x = _slice(data["x0"], case["counts"], rank).requires_grad_()
    y = net(x)
    (y * _slice(data["dy0"], case["counts"], rank)).sum().backward()
    out = {"y0": y.detach().numpy(), "dx0": x.grad.numpy()}
    out.update({f"grad.{name}": _summed(p.grad) for name, p in net.named_parameters()})
    out.update({f"buffer.{name}": b.numpy().copy() for name, b in net.named_buffers()})
    return out


def _compiled(case, data, rank):
    """A synchronized layer inside ``torch.compile``: its synchronized
    forward runs eagerly (a graph break), with the same results."""
    m = SyncBatchNorm(case["C"], dtype=torch.float64)
    compiled = torch.compile(m, backend="eager")
    x = _slice(data["x0"], case["counts"], rank).requires_grad_()
    y = compiled(x)
    (y * _slice(data["dy0"], case["counts"], rank)).sum().backward()
    return {"y0": y.detach().numpy(), "dx0": x.grad.numpy(), "dw0": _summed(m.weight.grad),
            "db0": _summed(m.bias.grad), "rm0": m.running_mean.numpy(), "rv0": m.running_var.numpy()}


def main(cases_dir: Path, out_dir: Path) -> None:
    warnings.simplefilter("error")  # as the test suite: a warning (a deprecated collective...) is a failure
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # every rank creates every group, in the same order (torch's rule); then each its own one-rank group
    alone = [dist.new_group([r]) for r in range(dist.get_world_size())][rank]
    for case in json.loads((cases_dir / "cases.json").read_text()):
        data = np.load(cases_dir / f"{case['name']}.npz")
        try:
            kind = case.get("kind", "layer")
            if kind == "model":
                out = _model(case, data, rank)
            elif kind == "compiled":
                out = _compiled(case, data, rank)
            else:
                out = _layer(case, data, rank, alone if kind == "alone" else None)
        except Exception as exc:  # recorded: the test says what each rank should have raised
            traceback.print_exc()
            out = {"error": np.array(f"{type(exc).__module__}.{type(exc).__name__}: {exc}")}
        np.savez(out_dir / f"{case['name']}_rank{rank}.npz", **out)
    adapter = sync.communicator()
    meta = {"cached": np.array(adapter is sync.communicator(None) and adapter is sync.communicator(
        dist.group.WORLD)), "calls": np.array(adapter.calls), "adapters": np.array(len(sync._ADAPTERS)),
        "sync_error_is": np.array(bnkernels.SyncError.__module__ + "." + bnkernels.SyncError.__name__)}
    np.savez(out_dir / f"meta_rank{rank}.npz", **meta)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
