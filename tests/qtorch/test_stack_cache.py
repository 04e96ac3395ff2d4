import os
import subprocess
import sys
import textwrap
import threading

import pytest

from qtorch import _stack_cache

needs_cache = pytest.mark.skipif(not _stack_cache.applicable(),
                                 reason="this interpreter keeps its frame-stack chunks itself (CPython 3.13+), "
                                        "or QTORCH_STACK_CACHE=0")


def _run(code: str, **env) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (the allocator is the interpreter's: each test starts from its own), with
    ``DEEP`` defined."""
    full_env = {k: v for k, v in os.environ.items() if k != _stack_cache.ENV}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", f"DEEP = {DEEP!r}\n" + textwrap.dedent(code)],
                          capture_output=True, text=True, env=full_env, timeout=300)


# a recursion whose frames take ~1 KiB each (128 local variables): 16 of them fill a chunk, so 200 deep spans a
# dozen chunks, each freed as the recursion returns
DEEP = ("def depth(n):\n"
        "    if n == 0:\n"
        "        return 0\n"
        "    " + "; ".join(f"a{i} = n" for i in range(128)) + "\n"
        "    return 1 + depth(n - 1) + 0 * a127\n")
exec(DEEP)
_depth = depth  # noqa: F821 (defined by the exec above)


def test_the_first_quantized_weight_installs_it_and_the_variable_keeps_it_off():
    code = """
        import torch, qtorch
        from qtorch import _stack_cache as s
        before = s.installed()
        qtorch.quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 32)), exclude=())
        print(before, s.installed(), s.applicable())
    """
    on = _run(code)
    assert on.returncode == 0, on.stderr
    before, after, applicable = on.stdout.split()
    assert before == "False" and after == applicable
    off = _run(code, QTORCH_STACK_CACHE="0")
    assert off.returncode == 0, off.stderr
    assert off.stdout.split() == ["False", "False", "False"]


def test_a_model_unpickled_in_a_new_process_installs_it_too(tmp_path):
    import torch

    import qtorch

    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    qtorch.quantize_model(model, exclude=())
    torch.save(model, tmp_path / "m.pt")
    r = _run(f"""
        import torch, qtorch
        from qtorch import _stack_cache as s
        before = s.installed()
        m = torch.load({str(tmp_path / "m.pt")!r}, weights_only=False)
        print(before, s.installed(), s.applicable(), type(m[0]).__name__)
    """)
    assert r.returncode == 0, r.stderr
    before, after, applicable, name = r.stdout.split()
    assert before == "False" and after == applicable and name == "QuantLinear"


@needs_cache
def test_freed_chunks_are_kept_and_handed_out_again():
    assert _stack_cache.install() and _stack_cache.installed()
    assert _depth(200) == 200
    assert _stack_cache.cached_chunks() == _stack_cache.SLOTS
    for _ in range(20):  # taken on the way down, kept again on the way up
        assert _depth(200) == 200
        assert _stack_cache.cached_chunks() == _stack_cache.SLOTS


@needs_cache
def test_threads_crossing_chunk_edges_at_once_get_their_own_chunks():
    assert _stack_cache.install()
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch inside the recursions, with chunks taken and kept in between
    errors = []

    def work(n):
        for i in range(60):
            d = 30 + (n * 97 + i * 31) % 170
            if _depth(d) != d:
                errors.append((n, d))

    try:
        threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors
    assert 0 < _stack_cache.cached_chunks() <= _stack_cache.SLOTS


@needs_cache
def test_uninstall_gives_the_previous_allocator_back_with_the_kept_chunks():
    r = _run("""
        import sys
        from qtorch import _stack_cache as s
        exec(DEEP)
        before = s._current().alloc
        assert s.install() and s.installed() and s._current().alloc != before
        assert depth(200) == 200 and s.cached_chunks() == s.SLOTS
        assert s.uninstall() and not s.installed() and s._current().alloc == before and s.cached_chunks() == 0
        assert not s.uninstall()
        assert depth(200) == 200 and s.cached_chunks() == 0   # chunks freed through the interpreter's own
        assert s.install() and depth(200) == 200 and s.cached_chunks() == s.SLOTS
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@needs_cache
def test_a_forked_child_and_an_exit_with_threads_still_running_are_safe():
    r = _run("""
        import os, threading, time
        from qtorch import _stack_cache as s
        exec(DEEP)
        assert s.install()
        pid = os.fork()
        if pid == 0:
            ok = all(depth(30 + 97 * i % 170) == 30 + 97 * i % 170 for i in range(200))
            os._exit(0 if ok and s.installed() else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        def spin():
            while True:
                depth(150)
        for _ in range(3):
            threading.Thread(target=spin, daemon=True).start()
        time.sleep(0.2)
        print("ok")   # then the interpreter exits with the threads inside their recursions
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_an_interpreter_without_the_cost_is_left_alone(monkeypatch):
    monkeypatch.setenv(_stack_cache.ENV, "0")
    assert not _stack_cache.applicable()
    if not _stack_cache.installed():
        assert _stack_cache.install() is False and not _stack_cache.installed()
