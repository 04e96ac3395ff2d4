"""A process that ran qcore's kernels and qtorch's layers on torch's OpenMP team forks safely: the child's torch ops
on 2 threads, its quantized layers, its qcore kernels and its own child finish, with ``os.fork``, a
``multiprocessing`` "fork" context and a forking DataLoader; the parent keeps working after, with its thread
settings.

Every child step runs under a 20 s hang guard: before the fix, the child's first 2-thread torch op waited forever
in GNU OpenMP for the parent's team workers, which a child does not have.
"""

import multiprocessing
import os
import select
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import qcore
import qcore._parallel as P
import qtorch
from qcore import PerChannel, PerGroup, QuantScheme, _team
from qtorch import _omp

pytestmark = pytest.mark.skipif(not hasattr(os, "register_at_fork"), reason="needs fork")
GUARD_S = 20  # hang guard per child step; each takes well under a second
THREADS = 2


class Work:
    """Everything the parent runs before forking, and what the child must reproduce."""

    def __init__(self):
        rng = np.random.default_rng(0)
        torch.manual_seed(0)
        self.codes = {b: rng.integers(0, 1 << b, (1024, 1024), dtype=np.uint8) for b in (1, 2, 3, 4, 5, 8)}
        self.x = rng.standard_normal((1024, 1024)).astype(np.float32)
        self.layers = [(cls.from_linear(torch.nn.Linear(512, 256, dtype=dtype)), dtype)
                       for cls in (qtorch.W8A16Linear, qtorch.W4A16Linear) for dtype in (torch.float32, torch.bfloat16)]
        self.inputs = [torch.randn(rows, 512) for rows in (1, 300)]
        self.a = torch.randn(600, 600)
        self.a_squared = self.a.numpy() @ self.a.numpy()  # NumPy's BLAS: no torch op in the parent

    def kernels(self):
        """Every public qcore kernel; the packed bytes and quantized codes."""
        out = []
        for b, c in self.codes.items():
            p = qcore.pack(c, b)
            out += [p, qcore.unpack(p, b, c.shape[-1])]
        for scheme in (QuantScheme(8, True, PerChannel(0)), QuantScheme(4, False, PerGroup(128))):
            qa = qcore.quantize(self.x, scheme)
            out += [qa.codes, qcore.dequantize(qa), qcore.fake_quantize(self.x, scheme)]
        return out

    def forwards(self):
        with torch.no_grad():
            return [q(x.to(dtype)) for q, dtype in self.layers for x in self.inputs]


def _equal(a, b) -> bool:
    return len(a) == len(b) and all((torch.equal(x, y) if isinstance(x, torch.Tensor) else np.array_equal(x, y))
                                    for x, y in zip(a, b))


@pytest.fixture
def parent(monkeypatch):
    """The parent's work, run on a 2-thread team (whatever the machine's cores), counting team calls."""
    torch_threads = torch.get_num_threads()
    monkeypatch.setattr(P, "NUM_THREADS", THREADS)
    monkeypatch.setattr(P, "DYNAMIC", False)
    team_calls = []
    run, team_call = _team.run, _omp.team_call

    def counted_run(kernel, block, nthreads, *rest):
        ran = run(kernel, block, nthreads, *rest)
        team_calls.append(ran and nthreads >= 2)
        return ran

    def counted_call(*args, **kw):
        ran = team_call(*args, **kw)
        team_calls.append(ran)
        return ran

    monkeypatch.setattr(_team, "run", counted_run)
    monkeypatch.setattr(_omp, "team_call", counted_call)
    w = Work()
    torch.set_num_threads(1)
    w.forwards()  # compiles the one-thread kernels a forked child runs: no numba compile under the guard
    torch.set_num_threads(THREADS)
    w.expected = (w.kernels(), w.forwards())
    yield w, team_calls
    torch.set_num_threads(torch_threads)


def _child_steps(w, say):
    """The child's work, one line to the parent per step: the parent's guard names the step that hung."""
    torch.set_num_threads(THREADS)
    say("threads", torch.get_num_threads() == THREADS)
    say("matmul", np.allclose((w.a @ w.a).numpy(), w.a_squared, rtol=1e-4, atol=1e-3))
    say("forward", _equal(w.forwards(), w.expected[1]))
    say("kernels", _equal(w.kernels(), w.expected[0]))
    say("matmul again", np.allclose((w.a @ w.a).numpy(), w.a_squared, rtol=1e-4, atol=1e-3))
    pid = os.fork()  # the child's own child, after the child's 2-thread torch ops
    if pid == 0:  # pragma: no cover - the grandchild
        code = 3
        try:
            signal.alarm(GUARD_S // 2)  # a hang ends the grandchild (SIGALRM) before the parent's guard
            code = 0 if np.allclose((w.a @ w.a).numpy(), w.a_squared, rtol=1e-4, atol=1e-3) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    say("grandchild matmul", os.waitstatus_to_exitcode(status) == 0)


def _child(w, wfd):
    def say(step, ok):
        os.write(wfd, f"{step}:{'ok' if ok else 'WRONG'}\n".encode())
    try:
        _child_steps(w, say)
        say("done", True)
    except BaseException as e:  # pragma: no cover - reported to the parent
        os.write(wfd, f"error:{type(e).__name__}: {e}\n".encode().replace(b"\n", b" ") + b"\n")


def _watch(rfd, alive, kill) -> list[str]:
    """The child's step lines, waiting at most GUARD_S for each; kills a child that hangs and fails the test."""
    lines, buf, last = [], b"", "fork"
    while True:
        ready, _, _ = select.select([rfd], [], [], GUARD_S)
        if not ready:
            kill()
            pytest.fail(f"the forked child hung for {GUARD_S} s after step {last!r} (steps done: {lines})")
        chunk = os.read(rfd, 4096)
        if not chunk:
            if alive():
                continue
            return lines
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            lines.append(line.decode())
            last = line.decode()
            if last == "done:ok" or last.startswith("error:"):
                return lines


def _check(lines):
    assert lines and lines[-1] == "done:ok", lines
    assert all(line.endswith(":ok") for line in lines), lines


def _fork_directly(w):
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(rfd)
            _child(w, wfd)
        finally:
            os._exit(0)
    os.close(wfd)
    state = {"status": None}

    def alive():
        if state["status"] is None:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                state["status"] = status
        return state["status"] is None

    def kill():
        os.kill(pid, 9)
        os.waitpid(pid, 0)

    try:
        lines = _watch(rfd, alive, kill)
    finally:
        os.close(rfd)
    if state["status"] is None:
        _, state["status"] = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(state["status"]) == 0
    return lines


def _fork_with_multiprocessing(w):
    rfd, wfd = os.pipe()
    p = multiprocessing.get_context("fork").Process(target=_child, args=(w, wfd))
    p.start()
    os.close(wfd)

    def kill():
        p.kill()
        p.join()

    try:
        lines = _watch(rfd, p.is_alive, kill)
    finally:
        os.close(rfd)
    p.join(GUARD_S)
    assert p.exitcode == 0
    return lines


@pytest.mark.parametrize("fork", [_fork_directly, _fork_with_multiprocessing], ids=["os.fork", "mp-fork"])
def test_a_child_forked_after_qcore_and_qtorch_ran_on_torchs_team_runs_torch_on_two_threads(parent, fork):
    w, team_calls = parent
    assert any(team_calls), "the parent's kernels did not run on a team of 2+ threads: nothing was tested"
    _check(fork(w))
    # the parent after its child: its team, its thread count, its results
    assert torch.get_num_threads() == THREADS and _team.team_threads() == THREADS
    team_calls.clear()
    assert _equal(w.kernels(), w.expected[0]) and _equal(w.forwards(), w.expected[1])
    assert any(team_calls)
    assert np.allclose((w.a @ w.a).numpy(), w.a_squared, rtol=1e-4, atol=1e-3)


def test_a_child_forks_safely_again(parent):
    # the parent's team starts again after a fork; the next fork must release it again
    w, _ = parent
    for _ in range(2):
        _check(_fork_directly(w))
        w.kernels()
        w.forwards()


class _Rows(torch.utils.data.Dataset):
    def __init__(self, w):
        self.w = w

    def __len__(self):
        return 2

    def __getitem__(self, i):
        torch.set_num_threads(THREADS)  # a DataLoader worker starts on 1 thread; this one asks for 2
        w = self.w
        with torch.no_grad():
            return (w.a @ w.a)[0, :4], w.layers[0][0](w.inputs[1])[0, :4]


def test_a_forking_dataloader_worker_runs_torch_and_the_layers(parent):
    w, _ = parent
    loader = torch.utils.data.DataLoader(_Rows(w), batch_size=1, num_workers=1, multiprocessing_context="fork",
                                         timeout=GUARD_S)  # the DataLoader's own hang guard
    rows = list(loader)
    assert len(rows) == 2
    with torch.no_grad():
        np.testing.assert_allclose(rows[0][0][0].numpy(), w.a_squared[0, :4], rtol=1e-4, atol=1e-3)
        assert torch.equal(rows[0][1][0], w.expected[1][1][0, :4])


def test_omp_num_threads_and_torchs_thread_count_hold_across_a_fork():
    # releasing the team before a fork keeps the runtime's settings: OMP_NUM_THREADS in a fresh process, and
    # torch.set_num_threads, in the parent and in the child
    code = textwrap.dedent("""
        import os, numpy as np, torch, qcore, qcore._team as T
        c = np.random.default_rng(0).integers(0, 16, (2048, 2048), dtype=np.uint8)
        omp_max = T.gomp_parallel().max_threads  # the runtime's own count (the child has no qcore team to ask)
        seen = [torch.get_num_threads(), T.team_threads(), omp_max()]
        qcore.pack(c, 4)
        pid = os.fork()
        if pid == 0:
            os._exit(10 * torch.get_num_threads() + omp_max())
        _, status = os.waitpid(pid, 0)
        qcore.pack(c, 4)
        torch.set_num_threads(2)
        qcore.pack(c, 4)
        pid = os.fork()
        if pid == 0:
            os._exit(10 * torch.get_num_threads() + omp_max())
        _, status2 = os.waitpid(pid, 0)
        print(*seen, os.waitstatus_to_exitcode(status), torch.get_num_threads(), T.team_threads(),
              os.waitstatus_to_exitcode(status2))
    """)
    if _team.gomp_parallel() is None:
        pytest.skip("no OpenMP runtime in this process")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1", "1", "11", "2", "2", "22"]
