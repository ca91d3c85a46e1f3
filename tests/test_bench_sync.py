"""``bnkernels bench --sync`` (``bnkernels/bench/sync.py``, the ``--sync``
path of ``bnkernels/cli/bench.py``): the real command under ``mpiexec -n 2``
and ``-n 1`` on tiny shapes, the table's figures against the protocol's
frame formula, and, in this process with stand-in communicators (no MPI),
the timing wrapper, a corrupted collective failing the command and the
error without mpi4py. No test looks at how fast anything is."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "distributed"))

from bnkernels.bench import Timing, parse_cases, sync  # noqa: E402
from bnkernels.cli import main  # noqa: E402
from bnkernels.distributed import protocol  # noqa: E402
from helpers import OneRank  # noqa: E402
from launch import mpiexec, run  # noqa: E402

HAVE_MPI = importlib.util.find_spec("mpi4py") is not None
CPU_BACKENDS = ("numba", "numpy") if importlib.util.find_spec("numba") else ("numpy",)
MPIEXEC = mpiexec()
needs_mpi = pytest.mark.skipif(not (HAVE_MPI and MPIEXEC), reason="needs mpi4py and mpiexec")

#: C = 8 (payload 17, below the initial capacity) and C = 80 (payload 161: the capacity grows)
SHAPES = "4x8x5x5,8x80"
CHANNELS = {"4x8x5x5": 8, "8x80": 80}
FAST = ["--shapes", SHAPES, "--dtype", "float32", "--repeat", "2", "--warmup", "1", "--min-time", "0"]
TIMEOUT = 180


def _frame_bytes(C: int, header: int) -> int:
    return 8 * (header + max(protocol.INITIAL_CAPACITY, 2 * C + 1))


def _command(ranks: int | None, *args: str) -> list[str]:
    """``bnkernels bench --sync *args`` under ``mpiexec -n ranks`` (None: alone)."""
    cmd = [sys.executable, "-m", "bnkernels", "bench", "--sync", *args]
    return cmd if ranks is None else [MPIEXEC, "-n", str(ranks), *cmd]


def _run(ranks: int | None, tmp_path, *extra):
    """The command on the tiny shapes: its output (stdout and stderr
    together) and the JSON it wrote; a hang fails the test (launch.run)."""
    path = tmp_path / f"sync{ranks}.json"
    proc = run(_command(ranks, *FAST, "--json", str(path), *extra), TIMEOUT)
    assert proc.returncode == 0, proc.stdout
    return proc.stdout, json.loads(path.read_text())


def _table(out: str) -> list[dict]:
    """The table's rows as {header: cell} (cells hold no spaces)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("shape "))
    headers = lines[start].split("  ")
    headers = [h.strip() for h in headers if h.strip()]
    rows = []
    for line in lines[start + 2:]:
        if not line.strip():
            continue
        if line.startswith("All figures"):
            break
        cells = line.split()
        assert len(cells) == len(headers), line
        rows.append(dict(zip(headers, cells)))
    return rows


def _check_report(out: str, doc: dict, ranks: int, backends=CPU_BACKENDS):
    assert out.count("bench --sync,") == 1  # rank 0 alone prints
    assert out.count("[1/") == 1  # and shows progress
    assert f"{ranks} rank{'s' if ranks != 1 else ''} on 1 host" in out
    rows = _table(out)
    assert {(r["shape"], r["backend"]) for r in rows} == {(s, b) for s in CHANNELS for b in backends}
    assert doc["ranks"] == ranks and len(doc["results"]) == len(rows)
    for r, d in zip(rows, doc["results"]):
        C = CHANNELS[r["shape"]]
        batch = int(r["whole"].split("x")[0])
        assert r["per rank"].split("x")[0] == str(batch // ranks)
        assert float(r["sync ms"]) > 0 and float(r["local ms"]) > 0 and float(r["coll ms"]) >= 0
        assert 0 <= float(r["in colls"].rstrip("%")) <= 100
        assert r["payload"] == str(2 * C + 1)
        assert int(r["fwd B"]) == _frame_bytes(C, protocol.H)
        assert int(r["bwd B"]) == _frame_bytes(C, 2 * protocol.H)
        assert r["colls"] == "2"
        assert d["status"] == "ok" and d["max_err"] <= d["tolerance"] and d["local_max_err"] <= d["tolerance"]
        assert d["forward_payload_values"] == d["backward_payload_values"] == 2 * C + 1
        assert d["forward_capacity"] == d["backward_capacity"] == max(protocol.INITIAL_CAPACITY, 2 * C + 1)
        assert 0 <= d["collective_share"] <= 1 and d["collective_s"] <= d["sync_s"] * 1.5
        assert len(d["rank_sync_s"]) == ranks and d["sync_s"] == max(d["rank_sync_s"])
        assert d["calls"] >= 2
        assert math.isclose(d["ratio"], d["sync_s"] / d["local_s"])
        assert float(r["sync/local"].rstrip("x")) == pytest.approx(d["ratio"], abs=0.006)
    return rows


@needs_mpi
def test_two_ranks(tmp_path):
    out, doc = _run(2, tmp_path)
    _check_report(out, doc, 2)
    assert "World size 1" not in out
    assert doc["mpi"]["hosts"] and len(doc["mpi"]["hosts"]) == 2


@needs_mpi
@pytest.mark.parametrize("ranks", [1, None], ids=["mpiexec-n1", "no-mpiexec"])
def test_one_rank_runs_and_says_so(tmp_path, ranks):
    out, doc = _run(ranks, tmp_path, "--backends", "numpy")
    _check_report(out, doc, 1, ("numpy",))
    assert "World size 1" in out and "mpiexec -n 2" in out


@needs_mpi
def test_usage_errors_are_printed_once_and_exit_2():
    for extra in (["--cold"], ["--backends", "torch"], ["--shapes", "3x8"]):
        proc = run(_command(2, *extra), TIMEOUT)
        assert proc.returncode == 2, (extra, proc.stdout)
        assert proc.stdout.count("error:") == 1 and proc.stdout.count("usage:") == 1, (extra, proc.stdout)


# --------------------------------------------------------------------------
# in this process: stand-in communicators of one rank
# --------------------------------------------------------------------------

class Corrupting(OneRank):
    """Adds 1 to the forward's mean and M2 (the count stays): y goes wrong."""

    def allgather(self, frame):
        out = frame[None].copy()
        out[:, protocol.H + 1:] += 1
        return out


def test_timed_communicator_records_frames_and_keeps_the_protocol_state():
    inner = OneRank()
    timed = sync.TimedCommunicator(inner)
    case = parse_cases("8x80")[0]
    from bnkernels.bench import make_inputs

    step = sync.training_step(make_inputs(case, np.float32), "numpy", timed)
    step()  # C = 80: payload 161 > 129, each collective runs twice (the capacity grows)
    assert timed.stats["allgather"].calls == timed.stats["allreduce"].calls == 2
    assert timed.capacity == {protocol.FORWARD: 161, protocol.BACKWARD: 161} and timed.calls == 2
    assert inner.capacity == {protocol.FORWARD: 129, protocol.BACKWARD: 129} and inner.calls == 0
    timed.reset()
    step()
    g, r = timed.stats["allgather"], timed.stats["allreduce"]
    assert g.calls == r.calls == 1 and g.seconds >= 0
    assert g.frame_values == {protocol.H + 161} and r.frame_values == {2 * protocol.H + 161}
    assert g.payload_values == r.payload_values == {161}
    assert g.sent_bytes == 8 * (protocol.H + 161)


def test_rows_in_process_and_split():
    cases = parse_cases("4x8x5x5,64x16@0")  # axis 0: the batch axis is 1
    res = sync.run_sync_benchmarks(OneRank(), cases, ["float32"], ["numpy"], Timing(2, 0, 0.0, 2))
    assert [r.status for r in res] == ["ok", "ok"]
    assert res[0].forward_frame_bytes == _frame_bytes(8, protocol.H)
    assert res[1].channels == 64 and res[1].forward_payload_values == 129
    assert sync.split_case(cases[1], 2).shape == (64, 8)
    assert sync.rank_slice(cases[1], 1, 2) == (slice(None), slice(8, 16))
    with pytest.raises(ValueError, match="does not split evenly"):
        sync.split_case(parse_cases("3x8")[0], 2)


def test_a_wrong_synchronized_result_fails_the_command(monkeypatch, capsys):
    monkeypatch.setattr(sync, "world", Corrupting)
    code = main(["bench", "--sync", "--shapes", "4x8x5x5", "--dtype", "float32", "--backends", "numpy", "--repeat", "1",
                 "--min-time", "0"])
    out = capsys.readouterr().out
    assert code == 1
    assert "WRONG" in out and "1 row(s) failed" in out


def test_without_mpi4py_the_error_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", None)
    assert main(["bench", "--sync"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "bnkernels[mpi]"' in err and "mpiexec -n 2 python -m bnkernels bench --sync" in err


def test_help_documents_sync(capsys):
    assert main(["bench", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--sync" in text and "mpiexec -n 2 python -m bnkernels bench --sync" in text
