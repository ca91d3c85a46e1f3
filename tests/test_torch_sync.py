"""``bnkernels.torch.SyncBatchNorm`` against torch's own batch norm.

Synchronized: one real 2-process ``torch.distributed`` job (gloo, CPU,
started here by ``torch.distributed.run``, once for the module: each start
costs seconds) runs every case of ``CASES`` on slices of one global batch
(``tests/distributed/torch_sync_worker.py``); each case is then compared
with one process holding the whole batch in torch's ``nn.BatchNorm*d``, in
float64: y and dx concatenated along the batch, the parameter gradients
summed over the ranks, the running statistics identical on both ranks.
Ranks that disagree must both raise ``bnkernels.SyncError`` (a hang fails
the job's timeout). Not synchronized (no process group, one rank, eval):
exactly ``bnkernels.torch.BatchNorm*d``, in this process.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
bt = pytest.importorskip("bnkernels.torch")
from helpers import OneRank  # noqa: E402
from bnkernels.torch import sync  # noqa: E402

nn = torch.nn
pytestmark = pytest.mark.torch

WORKER = Path(__file__).parent / "distributed" / "torch_sync_worker.py"
#: the whole job's limit: a rank left waiting must fail the test, not hang CI
TIMEOUT_S = 180
TOL = {"float32": 2e-5, "float64": 1e-11}
REFERENCE = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _case(name, C, spatial, counts, dtype="float64", channels_last=False, steps=2, eval=False, kind="layer",
          **more):
    return dict(name=name, C=C, spatial=list(spatial), counts=counts, dtype=dtype, channels_last=channels_last,
                steps=steps, eval=eval, kind=kind, options=more.pop("options", {}), **more)


CASES = [
    _case("nchw64", 3, (4, 4), [5, 17], eval=True),
    _case("channels_last32", 6, (3, 5), [5, 17], "float32", channels_last=True, eval=True),
    _case("empty_rank64", 4, (2, 3), [0, 9]),
    _case("empty_rank_channels_last32", 3, (3, 2), [7, 0], "float32", channels_last=True),
    _case("momentum_none_ncl64", 5, (6,), [3, 4], steps=3, eval=True, options=dict(momentum=None)),
    _case("nc64", 7, (), [2, 6], options=dict(eps=1e-3, momentum=0.3)),
    _case("no_stats32", 3, (2, 2), [4, 6], "float32", eval=True,
          options=dict(affine=False, track_running_stats=False)),
    _case("wide64", 80, (2, 2), [2, 3]),  # more than 64 channels: the frames' capacity grows (once)
    _case("ncdhw64", 2, (2, 3, 2), [1, 2], options=dict(bias=False)),
    _case("channels_disagree", 4, (2, 2), [4, 4], steps=1, channels=[3, 4]),
    _case("dtypes_disagree", 3, (2, 2), [4, 4], steps=1, dtypes=["float32", "float64"]),
    _case("one_value_in_all", 2, (), [1, 0], steps=1),
    _case("after_the_errors64", 3, (2, 3), [6, 2]),  # the protocol's state is still the same on both ranks
    _case("one_rank_groups", 3, (2, 2), [5, 6], kind="alone"),  # each rank on its own group: no sync
    _case("model", 3, (5, 5), [3, 5], steps=1, kind="model", seed=0),
    _case("compiled", 3, (4, 4), [4, 6], steps=1, kind="compiled"),
]
BY_NAME = {c["name"]: c for c in CASES}


def _data(case, seed):
    rng = np.random.default_rng(seed)
    shape = (sum(case["counts"]), case["C"], *case["spatial"])
    data = {f"x{s}": rng.normal(3.0, 2.0, shape) for s in range(case["steps"])}
    data.update({f"dy{s}": rng.normal(0.3, 1.0, shape) for s in range(case["steps"])})
    data["xeval"] = rng.normal(3.0, 2.0, (4, *shape[1:]))
    data["weight"], data["bias"] = rng.uniform(0.5, 1.5, case["C"]), rng.normal(0.0, 1.0, case["C"])
    return data


def _run_job(cases_dir: Path, out_dir: Path) -> str:
    """The 2-process job; its output. A job that outlives ``TIMEOUT_S``
    (a rank waiting for the other) is killed, its whole process group."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "0", str(WORKER), str(cases_dir), str(out_dir)]
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # its own process group: torchrun and both ranks
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the 2-process job hung (killed after {TIMEOUT_S} s):\n{output[-6000:]}")
    assert proc.returncode == 0, f"the 2-process job failed ({proc.returncode}):\n{output[-6000:]}"
    return output


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Every case's inputs, and what each rank wrote: ``job(name, rank)``."""
    if not torch.distributed.is_available():
        pytest.skip("this torch has no torch.distributed")
    root = tmp_path_factory.mktemp("torch_sync")
    cases_dir, out_dir = root / "cases", root / "out"
    cases_dir.mkdir()
    out_dir.mkdir()
    inputs = {}
    for i, case in enumerate(CASES):
        inputs[case["name"]] = _data(case, seed=i)
        np.savez(cases_dir / f"{case['name']}.npz", **inputs[case["name"]])
    (cases_dir / "cases.json").write_text(json.dumps(CASES))
    _run_job(cases_dir, out_dir)

    def load(name, rank):
        with np.load(out_dir / f"{name}_rank{rank}.npz") as f:
            return {k: f[k] for k in f.files}

    load.inputs = inputs
    return load


def _close(actual, expected, dtype, what, scale=1.0):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: {actual.shape} != {expected.shape}"
    if actual.size:
        err = np.abs(actual - expected).max()
        bound = TOL[dtype] * scale * (1 + np.abs(expected).max())
        assert err <= bound, f"{what}: off by {err:.3g} (bound {bound:.3g})"


def _reference(case, data, x_of, params=True):
    """torch's batch norm (float64) over the batches ``x_of(step)``: per
    step y, dx, dweight, dbias, running statistics; then eval on xeval."""
    C = case["C"]
    ref = REFERENCE[2 + len(case["spatial"])](C, dtype=torch.float64, **case["options"])
    with torch.no_grad():
        for name in ("weight", "bias") if params else ():
            if getattr(ref, name) is not None:
                getattr(ref, name).copy_(torch.from_numpy(data[name]))
    steps = []
    for step in range(case["steps"]):
        x, dy = x_of(step)
        x = torch.from_numpy(x).requires_grad_()
        y = ref(x)
        (y * torch.from_numpy(dy)).sum().backward()
        got = {"y": y.detach().numpy(), "dx": x.grad.numpy()}
        for key, p in (("dw", ref.weight), ("db", ref.bias)):
            if p is not None:
                got[key] = p.grad.numpy().copy()
        ref.zero_grad()
        if ref.track_running_stats:
            got.update(rm=ref.running_mean.numpy().copy(), rv=ref.running_var.numpy().copy(),
                       nbt=int(ref.num_batches_tracked))
        steps.append(got)
    ref.eval()
    return steps, ref(torch.from_numpy(data["xeval"])).detach().numpy()


LAYER_CASES = [c["name"] for c in CASES if c["kind"] == "layer" and "channels" not in c and "dtypes" not in c
               and c["name"] != "one_value_in_all"]


@pytest.mark.parametrize("name", LAYER_CASES)
def test_two_ranks_match_torchs_batch_norm_of_the_whole_batch(job, name):
    case, data = BY_NAME[name], job.inputs[name]
    dtype = case["dtype"]
    ranks = [job(name, 0), job(name, 1)]
    for r in ranks:
        assert "error" not in r, str(r["error"])
    steps, y_eval = _reference(case, data, lambda s: (data[f"x{s}"], data[f"dy{s}"]))
    for step, ref in enumerate(steps):
        for key in ("y", "dx"):  # the ranks' slices, in rank order, are the whole batch's
            got = np.concatenate([r[f"{key}{step}"] for r in ranks])
            _close(got, ref[key], dtype, f"{key} step {step}", scale=1 if key == "y" else 10)
        for r in ranks:
            assert r[f"kept_format{step}"], "y and dx keep the input's memory format"
        for key in ("dw", "db"):
            assert (key in ref) == (f"{key}{step}" in ranks[0]), key
            if key in ref:
                assert np.array_equal(ranks[0][f"{key}{step}"], ranks[1][f"{key}{step}"])
                _close(ranks[0][f"{key}{step}"], ref[key], dtype, f"{key} step {step}", scale=10)
        if "rm" in ref:
            for key in ("rm", "rv", "nbt"):  # updated alike on every rank
                assert np.array_equal(ranks[0][f"{key}{step}"], ranks[1][f"{key}{step}"]), key
                _close(ranks[0][f"{key}{step}"], ref[key], dtype, f"{key} step {step}")
        else:
            assert not any(k.startswith(("rm", "rv")) for k in ranks[0])
    if case["eval"]:  # rank 0 alone, no collective: its running statistics (or, without them, its batch's)
        _close(ranks[0]["yeval"], y_eval, dtype, "eval y")
        assert "yeval" not in ranks[1]


def test_one_rank_groups_normalize_each_rank_alone(job):
    """A process group of one rank (torch's rule: world size 1) makes no
    collective: each rank normalizes its own slice."""
    case, data = BY_NAME["one_rank_groups"], job.inputs["one_rank_groups"]
    start = 0
    summed = {}
    for rank, n in enumerate(case["counts"]):
        got = job("one_rank_groups", rank)
        steps, _ = _reference(case, data, lambda s: (data[f"x{s}"][start:start + n], data[f"dy{s}"][start:start + n]))
        for step, ref in enumerate(steps):
            for key in ("y", "dx", "rm", "rv"):
                _close(got[f"{key}{step}"], ref[key], "float64", f"rank {rank} {key} step {step}", scale=10)
            for key in ("dw", "db"):
                summed[key, step] = summed.get((key, step), 0) + ref[key]
        start += n
    for (key, step), total in summed.items():  # (the worker sums every gradient over the ranks)
        _close(got[f"{key}{step}"], total, "float64", f"{key} step {step}", scale=10)


@pytest.mark.parametrize("name,message", [
    ("channels_disagree", r"SyncError: .*disagree on the number of channels"),
    ("dtypes_disagree", r"SyncError: .*disagree on the dtype"),
    ("one_value_in_all", r"ValueError: Expected more than 1 value per channel when training.*over all 2 ranks"),
])
def test_ranks_that_disagree_all_raise_and_none_hangs(job, name, message):
    for rank in (0, 1):
        got = job(name, rank)
        assert "error" in got, f"rank {rank} did not raise"
        assert __import__("re").search(message, str(got["error"])), str(got["error"])
    assert job("channels_disagree", 0)["error"].item().startswith("bnkernels.errors.SyncError")


def test_a_converted_model_matches_torchs_on_the_whole_batch(job):
    """``convert_sync_batchnorm`` of a conv net, one training step on two
    ranks: the whole batch's outputs, input and parameter gradients and
    buffers (the cumulative average of ``momentum=None`` too)."""
    case, data = BY_NAME["model"], job.inputs["model"]
    torch.manual_seed(case["seed"])  # the worker's net, with torch's layers
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1),
                        nn.BatchNorm2d(3, momentum=None)).double()
    x = torch.from_numpy(data["x0"]).requires_grad_()
    y = net(x)
    (y * torch.from_numpy(data["dy0"])).sum().backward()
    ranks = [job("model", 0), job("model", 1)]
    _close(np.concatenate([r["y0"] for r in ranks]), y.detach().numpy(), "float64", "y")
    _close(np.concatenate([r["dx0"] for r in ranks]), x.grad.numpy(), "float64", "dx", scale=100)
    for name, p in net.named_parameters():
        _close(ranks[0][f"grad.{name}"], p.grad.numpy(), "float64", f"{name}.grad", scale=100)
    for name, b in net.named_buffers():
        assert np.array_equal(ranks[0][f"buffer.{name}"], ranks[1][f"buffer.{name}"]), name
        _close(ranks[0][f"buffer.{name}"], b.numpy(), "float64", name)


def test_under_torch_compile_the_synchronized_forward_runs_eagerly(job):
    case, data = BY_NAME["compiled"], job.inputs["compiled"]
    ranks = [job("compiled", 0), job("compiled", 1)]
    for r in ranks:
        assert "error" not in r, str(r["error"])
    (ref,), _ = _reference(dict(case, options={}), data, lambda s: (data["x0"], data["dy0"]), params=False)
    _close(np.concatenate([r["y0"] for r in ranks]), ref["y"], "float64", "y")
    _close(np.concatenate([r["dx0"] for r in ranks]), ref["dx"], "float64", "dx", scale=10)
    for key in ("dw", "db", "rm", "rv"):
        _close(ranks[1][f"{key}0"], ref[key], "float64", key, scale=10)


def test_one_adapter_per_process_group_and_the_same_calls_on_every_rank(job):
    meta = [job("meta", 0), job("meta", 1)]
    for m in meta:
        assert m["cached"] and int(m["adapters"]) == 1  # the world's (one-rank groups never synchronize)
    assert int(meta[0]["calls"]) == int(meta[1]["calls"]) > 2 * len(CASES)
    assert str(meta[0]["sync_error_is"]) == "bnkernels.errors.SyncError"


# --- not synchronized: in this process --------------------------------------------------------------


SHAPES = [(nn.BatchNorm1d, bt.BatchNorm1d, (6, 4)), (nn.BatchNorm1d, bt.BatchNorm1d, (5, 4, 3)),
          (nn.BatchNorm2d, bt.BatchNorm2d, (3, 4, 5, 2)), (nn.BatchNorm3d, bt.BatchNorm3d, (2, 4, 3, 2, 2))]


def _same_as_the_drop_in(make_sync, shapes=SHAPES, formats=(torch.contiguous_format, torch.channels_last)):
    """SyncBatchNorm gives bitwise the drop-in's results (the same kernels,
    no collective) and torch's within float32 rounding, training then eval."""
    for torch_cls, cls, shape in shapes:
        for fmt in formats if len(shape) == 4 else (torch.contiguous_format,):
            torch.manual_seed(0)
            layers = [torch_cls(shape[1], momentum=None), cls(shape[1], momentum=None), make_sync(shape[1], momentum=None)]
            for m in layers[1:]:
                m.load_state_dict(layers[0].state_dict())
            for step in range(3):
                if step == 2:
                    for m in layers:
                        m.eval()
                x = (torch.randn(shape) * 2 + 3).contiguous(memory_format=fmt)
                dy = torch.randn(shape)
                results = []
                for m in layers:
                    xi = x.clone().requires_grad_()
                    y = m(xi)
                    (y * dy).sum().backward()
                    results.append([y, xi.grad, m.weight.grad, m.bias.grad, *m.buffers()])
                    m.zero_grad()
                assert results[2][0].is_contiguous(memory_format=fmt)
                for ref, drop_in, mine in zip(*results):
                    assert torch.equal(mine, drop_in)
                    assert torch.allclose(mine.double(), ref.double(), rtol=1e-4, atol=1e-4)


def test_without_torch_distributed_it_is_the_batch_norm_drop_in():
    assert not torch.distributed.is_initialized()
    _same_as_the_drop_in(bt.SyncBatchNorm)
    assert not sync._ADAPTERS


def test_a_process_group_of_one_rank_makes_no_collective(tmp_path):
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("this torch has no torch.distributed")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        _same_as_the_drop_in(bt.SyncBatchNorm, formats=(torch.channels_last,))
        assert not sync._ADAPTERS  # (no Torch adapter was even made)
    finally:
        dist.destroy_process_group()


def test_the_class_is_torchs_sync_batch_norm():
    group = object()  # (kept, not used until a synchronized forward)
    m = bt.SyncBatchNorm(5, eps=1e-3, momentum=None, affine=True, track_running_stats=True, process_group=group,
                         dtype=torch.float64)
    ref = nn.SyncBatchNorm(5, eps=1e-3, momentum=None, process_group=group, dtype=torch.float64)
    assert isinstance(m, nn.SyncBatchNorm) and m.process_group is group
    assert bt.SyncBatchNorm.backend == "auto" and m.backend == "auto"
    assert list(m.state_dict()) == list(ref.state_dict()) and m.weight.dtype == torch.float64
    assert repr(m) == repr(ref) and bt.SyncBatchNorm(3, bias=False).bias is None
    with pytest.raises(ValueError, match="expected at least 2D input"):
        m(torch.randn(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="number of input channels should be non-zero"):
        bt.SyncBatchNorm(0)(torch.randn(3, 0))


def _tree():
    torch.manual_seed(0)
    frozen = nn.BatchNorm2d(4, eps=1e-3, momentum=0.2)
    frozen.eval()
    frozen.weight.requires_grad_(False)
    frozen.qconfig = "a qconfig"
    numpy_bn = bt.BatchNorm3d(2, affine=False)
    numpy_bn.backend = "numpy"
    return nn.Sequential(nn.Conv2d(3, 4, 1), frozen, nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False),
                                                                  numpy_bn), nn.SyncBatchNorm(6))


def test_convert_sync_batchnorm_keeps_tensors_modes_and_options():
    tree = _tree()
    before = {name: (m, dict(m.named_parameters(recurse=False)), dict(m.named_buffers(recurse=False)))
              for name, m in tree.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    keys = list(tree.state_dict())
    group = object()
    assert bt.SyncBatchNorm.convert_sync_batchnorm(tree, group) is tree
    assert list(tree.state_dict()) == keys
    modules = dict(tree.named_modules())
    for name, (old, params, buffers) in before.items():
        new = modules[name]
        assert type(new) is bt.SyncBatchNorm and new.process_group is group
        for key, p in params.items():
            assert getattr(new, key) is p
        for key, b in buffers.items():
            assert getattr(new, key) is b
        assert (new.training, new.eps, new.momentum, new.affine, new.track_running_stats) == (
            old.training, old.eps, old.momentum, old.affine, old.track_running_stats)
        assert getattr(new, "qconfig", None) == getattr(old, "qconfig", None)
        assert new.backend == getattr(old, "backend", "auto")
    assert not modules["1"].training and not modules["1"].weight.requires_grad and modules["1"].qconfig
    assert modules["2.1"].backend == "numpy" and modules["2.0"].running_mean is None
    root = nn.BatchNorm2d(3)
    new = bt.SyncBatchNorm.convert_sync_batchnorm(root)
    assert type(new) is bt.SyncBatchNorm and new.weight is root.weight and new.process_group is None
    with pytest.raises(ValueError, match="LazyBatchNorm2d has uninitialized parameters"):
        bt.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.LazyBatchNorm2d()))


def test_convert_turns_torchs_sync_batch_norm_into_bnkernels():
    group = object()
    root = nn.SyncBatchNorm(4, momentum=0.3, process_group=group)
    new = bt.convert(root, backend="numpy")
    assert type(new) is bt.SyncBatchNorm and new.process_group is group and new.backend == "numpy"
    assert new.weight is root.weight and new.running_var is root.running_var and new.momentum == 0.3
    tree = nn.Sequential(nn.BatchNorm2d(3), nn.SyncBatchNorm(3))
    assert bt.convert(tree) is tree
    assert [type(m) for m in tree] == [bt.BatchNorm2d, bt.SyncBatchNorm]
    assert bt.convert(tree) is tree and type(tree[1]) is bt.SyncBatchNorm  # idempotent


class _Block(nn.Module):
    """A torchvision-like residual block (its names: conv1, bn1, ..., downsample.1)."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.downsample = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))


def _resnet_like():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 7), nn.BatchNorm2d(4), nn.Sequential(_Block(4), _Block(4)))


def test_a_torchvision_like_state_dict_loads_into_the_converted_model():
    trained = _resnet_like()
    with torch.no_grad():
        for name, t in trained.state_dict().items():
            if t.is_floating_point():
                t.uniform_(0.5, 1.5)
            else:
                t.fill_(7)
    state = trained.state_dict()
    mine = bt.SyncBatchNorm.convert_sync_batchnorm(_resnet_like())
    theirs = nn.SyncBatchNorm.convert_sync_batchnorm(_resnet_like())
    assert list(mine.state_dict()) == list(theirs.state_dict()) == list(state)
    mine.load_state_dict(state)  # strict
    for key, t in mine.state_dict().items():
        assert torch.equal(t, state[key]), key
    assert sum(isinstance(m, bt.SyncBatchNorm) for m in mine.modules()) == 7


def test_batch_norm_with_a_comm_threads_it_through_autograd():
    """``batch_norm(..., comm=c)``: the forward and its backward each make
    one round on c (a world of one: the unsynchronized results)."""
    comm, gen = OneRank(), torch.Generator().manual_seed(3)
    x = (torch.randn(6, 3, 4, 2, generator=gen, dtype=torch.float64) * 2 + 3).contiguous(
        memory_format=torch.channels_last)
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    results = []
    for c in (None, comm):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
        rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        y = bt.batch_norm(xi, rm, rv, wi, bi, training=True, comm=c)
        assert comm.calls == (1 if c is comm else 0)
        (y * dy).sum().backward()
        results.append([y, xi.grad, wi.grad, bi.grad, rm, rv])
    assert comm.calls == 2
    for plain, synced in zip(*results):
        torch.testing.assert_close(synced, plain, rtol=1e-12, atol=1e-12)
    assert results[1][0].is_contiguous(memory_format=torch.channels_last)


def test_under_torch_compile_fullgraph_a_comm_is_refused_clearly():
    def f(x):
        return bt.batch_norm(x, None, None, training=True, comm=OneRank())

    with pytest.raises(Exception, match="synchronized batch norm .* runs eagerly"):
        torch.compile(f, backend="eager", fullgraph=True)(torch.randn(4, 3))
