"""``qtorch.compile``: torch.compile set up for quantized inference, in one call.

>>> import torch, qtorch
>>> m = torch.nn.Sequential(qtorch.W8A16Linear(64, 32), torch.nn.ReLU())
>>> cm = qtorch.compile(m)                    # nothing global is changed; compiles lazily
>>> cm(torch.randn(2, 64)).shape
torch.Size([2, 32])

What it sets, for this compilation only (``torch.compile(options=...)`` patches inductor's config while it
compiles this model; the few settings the trace itself must see are set while Dynamo compiles inside a call, or
around each call, and restored after, see :func:`_tracing_setup`):

* ``freezing=True``: parameters and buffers become graph constants, so inductor pre-packs dense weights (oneDNN)
  and can use its weight-only GEMM templates. It applies only without autograd, so the returned module runs its
  forward under ``torch.no_grad()``. Like any frozen graph it holds the weights of the first call: change a
  weight in place and compile again. Codes stay codes: nothing that reads a quantized weight's int8/uint8 codes
  is constant-folded, so no full-precision copy of a quantized weight is ever made.
* ``max_autotune=True`` (``mode="max-autotune"`` without CUDA graphs on CPU): inductor benchmarks its C++ GEMM
  templates against the ATen kernels at each shape and keeps the faster one.

With max-autotune on CPU, ``qtorch.compile`` first decides, per quantized layer shape (out x in, scheme, compute
dtype), which layout its layers hold in compiled inference (:func:`choose_layouts`), by measurement on this machine,
as the eager layout choice does: inductor's template layout (``int8pack`` / ``int4pack``, whose ops it has
weight-only templates for) against qtorch's own (``blocked``, and ``vnni`` on CPUs with AVX512-VNNI: custom ops
that inductor cannot see into, each still running the path its eager dispatcher measured). Each candidate is a
one-layer probe on a copy of the weight, compiled with the same options and timed at the rows the model will run
(``rows=``, default one-row decoding steps and 128-row prompt calls weighed as a request,
:data:`qtorch.autotune.REQUEST_CALLS`); at one row a probe calls up to :data:`PROBE_COPIES` copies in turn in one
compiled call, each weight read from memory with the code hot, as a compiled model's layers run. The decision is
kept like the dispatcher's (the process and ``$QTORCH_CACHE_DIR``, key ``layout|NxK|compiled-<scheme>-rows<r+r>|...``).
The layers that read the same input (attention's query, key and value; an MLP's gate and up), seen in the model's
first call, which runs eagerly for that, are weighed together: compiled, the ``blocked`` ones among them run as one
call at one row (:mod:`qtorch.siblings`), and what that saves, timed on probes of each kind of set, can hold a
shape in ``blocked`` that is slower alone (:mod:`qtorch.sibling_layouts`).
``QTORCH_LAYOUT`` forces a layout; ``QTORCH_AUTOTUNE=0`` measures nothing and takes the static order of
:func:`qtorch.layouts.default_policy` (the template layout on CPUs other than AVX2, else ``blocked``). Then every
quantized layer runs each of ``rows`` once eagerly, so that the trace takes the path measured for it. The
state_dict and the outputs (within the dtype's tolerance) are the same in every layout.

Where the layers hold a template layout, inductor's cache blocking for its GEMM templates is measured too
(:func:`choose_blocking`: inductor's own against K blocks of 256 and 512 inputs, one setting for the model, passed
as inductor's ``cpp.gemm_cache_blocking`` while the model's graphs compile, as ``torch.compile``'s options refuse
it). Inductor sizes a K block so that the dequantized bfloat16 block of the weight alone fills 80% of L1; on the
AMX Xeon 4096 x 4096 8-bit bfloat16 at 128 rows ran 0.95-1.04x of compiled dense so and 1.04-1.11x with
256-input blocks.

The own layouts are probed compiled too, not timed eagerly: a custom op is not its eager call (K = N = 4096 8-bit,
bf16, one row, same run, best of 200 at a load of 3.4: eager ``blocked`` 0.44 ms, compiled 0.65 ms, where the op
runs the one-row kernel without the layer's kept plan and pays the op's dispatch; the compiled template 0.53 ms).
Cost, once per shape and ``rows`` on a machine (per process where it was measured beside other work, as for the
dispatcher): a compile per candidate and row count, then up to :data:`PROBE_BUDGET_S` of timed calls per row count.
K = N = 4096 on the 2-core Xeon at a load of 5: 6-16 s per shape and row count with inductor's caches cold, about
1 s with its on-disk caches warm. Each probe's copy of the weight stays referenced by inductor's in-process caches
after the decision (as any frozen graph's constants): one copy of the codes per candidate and probed shape.

Which op each quantized layout puts in the graph (CPU, bfloat16):

==============  ===============================================================================================
layout          traced op
==============  ===============================================================================================
``int8pack``    ``torch._weight_int8pack_mm`` with max-autotune (even where the eager dispatcher chose
                ``dequant_mm``): inductor's AMX / AVX-512 template, or the ATen kernel, whichever it measures faster
``int4pack``    ``torch._weight_int4pack_mm_for_cpu``: the same, with inductor's int4 template
``blocked``     qtorch's custom ops (``qtorch::amx_blocked``, ``qtorch::gemm_blocked``, ``qtorch::tiles_blocked``,
                ``qtorch::tiles_act_blocked``: the path kept for the row bucket): no template reads this layout
``vnni``        ``qtorch::vnni_linear``: the integer dot products of its one-row kernel, AMX-INT8 for more rows
``canonical``   dequantize + ``F.linear``, or the ``qtorch::dequant_mm`` custom op; the codes stay int8/uint8
==============  ===============================================================================================

Measured with K = N = 4096, bfloat16, one thread, dense and quantized calls alternating, medians (Intel Xeon
with AMX, torch 2.13, a 2-core machine shared with other jobs): at 128 rows the template ran the int8 layer at
1.02-1.45x and the int4 layer at 0.99-1.38x of the frozen dense layer across four runs, where the ATen kernels
took about 7x longer than the template and ``dequant_mm`` ran at 0.61x of dense (0.40x at 16 rows). Folding is
kept off every 1-byte integer constant of the model, not only codes (a uint8 mask is then converted per call).
"""

from __future__ import annotations

import copy
import functools
import itertools
import threading
import types
import warnings

import torch
from torch import nn

from .tune import layer_groups

__all__ = ["compile", "CompiledModule", "compile_options"]


def compile_options(device_type: str = "cpu", *, autotune: bool = True) -> dict:
    """The inductor options ``qtorch.compile`` passes for ``device_type``: on the CPU with
    :data:`qtorch.siblings.PASS` (one call for the blocked layers that read the same row), unless inductor's
    config holds a post-grad pass of the caller's already (which stays)."""
    opts = {"freezing": True}
    if device_type == "cpu":
        from torch._inductor import config

        from .siblings import PASS

        if config.post_grad_custom_post_pass is None:
            opts["post_grad_custom_post_pass"] = PASS
    if autotune:
        opts["max_autotune"] = True
        opts["coordinate_descent_tuning"] = True
        if device_type == "cuda":
            opts["triton.cudagraphs"] = True
    return opts


class CompiledModule(nn.Module):
    """A compiled model that runs without autograd (needed by freezing). ``_orig_mod`` is the model, as with
    ``torch.compile``; attribute access falls through to it. With ``choose_rows``, the first call runs the model
    eagerly and then chooses its layouts for those rows, and the template blocking (:meth:`_first_call`); the
    graphs compile from the second. ``options``: what its graphs compile with (the blocking included)."""

    def __init__(self, model: nn.Module, compiled, options: dict | None = None, choose_rows: tuple | None = None,
                 recompile=None):
        super().__init__()
        self._orig_mod = model
        self.training = model.training
        object.__setattr__(self, "_compiled", compiled)
        # what a call runs: the compiled module's forward (Dynamo's wrapper of the model's call) where it has one,
        # without the module call around it (nn.Module's hooks machinery and the optimized-module flag, which only
        # torch.distributed's module tracker reads: 10-20 us of a compiled one-row call, on caches the weights
        # just streamed through)
        run = getattr(compiled, "forward", None) if isinstance(compiled, _optimized_module()) else None
        object.__setattr__(self, "_run", run if callable(run) else compiled)
        opts = options or {}
        object.__setattr__(self, "_freezing", bool(opts.get("freezing")))
        object.__setattr__(self, "_woq", bool(opts.get("max_autotune")) and _device_type(model) == "cpu")
        # inductor's cache blocking, set while this model's graphs compile (torch.compile's options refuse it: its
        # declared default is None)
        object.__setattr__(self, "_blocking", opts.get(BLOCKING_OPTION))
        object.__setattr__(self, "_choose", None if choose_rows is None else (choose_rows, opts))
        # options -> the model compiled with them (lazily, as torch.compile does), where a choice may change them
        object.__setattr__(self, "_recompile", recompile)
        object.__setattr__(self, "options", dict(opts))
        object.__setattr__(self, "_choosing", threading.Lock())

    def forward(self, *args, **kwargs):
        if self._choose is not None:
            with self._choosing:  # (another thread's first call may be moving the weights)
                if self._choose is not None:
                    return self._first_call(args, kwargs)
        with _tracing_setup(self._freezing, self._woq, self._blocking):
            return self._run(*args, **kwargs)

    def _first_call(self, args, kwargs):
        """The model's eager call, which shows the layers that read the same input; then the layouts are chosen
        (:func:`choose_layouts` with those sets) for the calls to come, compiled. The call's output is returned
        whatever the choice does: the model ran (a KV cache grew), so a failed choice only warns, and the layers
        keep the layouts they hold."""
        from .sibling_layouts import record

        out, sets = record(self._orig_mod, args, kwargs)  # (raises before anything ran or changed: tried again)
        rows, opts = self._choose
        object.__setattr__(self, "_choose", None)
        try:
            choose_layouts(self._orig_mod, rows, opts, siblings=sets)
        except Exception as e:
            warnings.warn(f"qtorch.compile: the layout choice failed ({type(e).__name__}: {e}); the layers keep "
                          f"the layouts they hold", RuntimeWarning, stacklevel=3)
            return out
        try:
            blocking = None if self._recompile is None else choose_blocking(self._orig_mod, rows, opts)
        except Exception as e:
            warnings.warn(f"qtorch.compile: the template blocking choice failed ({type(e).__name__}: {e}); "
                          f"inductor's own holds", RuntimeWarning, stacklevel=3)
            blocking = None
        if blocking is not None:
            self._use({**opts, BLOCKING_OPTION: blocking})
        return out

    def _use(self, options: dict) -> None:
        """Compile the model with ``options`` from the next call on (nothing has been compiled yet: the graphs
        compile at the first call after the choices)."""
        compiled = self._recompile(options)
        run = getattr(compiled, "forward", None) if isinstance(compiled, _optimized_module()) else None
        object.__setattr__(self, "_compiled", compiled)
        object.__setattr__(self, "_run", run if callable(run) else compiled)
        object.__setattr__(self, "_blocking", options.get(BLOCKING_OPTION))
        object.__setattr__(self, "options", dict(options))

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["_orig_mod"], name)


def _optimized_module() -> type:
    """The class ``torch.compile`` returns for a module (``OptimizedModule``), or a class nothing is an instance of."""
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - another torch layout
        return type("NoOptimizedModule", (), {})
    return OptimizedModule


#: True while qtorch.compile traces for inductor with max-autotune on CPU: the layouts then emit PyTorch's
#: weight-only ops, for which inductor has GEMM templates (see :func:`woq_templates`).
_WOQ_TEMPLATES = False
# 1-byte integer tensors in a graph are quantization codes: never unpacked or dequantized at compile time
_CODE_DTYPES = (torch.int8, torch.uint8)


def woq_templates() -> bool:
    """Whether the current trace is ``qtorch.compile``'s with inductor's max-autotune on CPU, where inductor
    has weight-only GEMM templates for ``torch._weight_int8pack_mm`` and ``torch._weight_int4pack_mm_for_cpu``
    (AMX/AVX-512 C++ micro-kernels that read the int8 / int4 weight as a frozen constant and convert it tile by
    tile). Inductor benchmarks them against the ATen kernel at each shape and keeps the faster. The layouts
    read this to put that op in the graph instead of their own custom op."""
    return _WOQ_TEMPLATES


def _reads_codes(folder, node) -> bool:
    """Whether the fx ``node`` reads a 1-byte integer tensor (a weight's codes)."""
    for a in node.all_input_nodes:
        t = getattr(folder.module, a.target, None) if a.op == "get_attr" else None
        if t is None:
            t = a.meta.get("val")
        if isinstance(t, torch.Tensor) and t.dtype in _CODE_DTYPES:
            return True
    return False


class _tracing_setup:
    """What the trace and the compilation inside this call must see (autograd off, and the following); everything
    is restored on return. A class, not a generator: it runs around every call of a compiled model (the generator
    form with ``torch.no_grad()`` cost ~20 us a call, a third of a compiled 4096-wide one-row layer's overhead).

    * ``torch._inductor.config.freezing``: Dynamo turns the module's parameters and buffers into graph
      constants only when it is on *while it traces* (``options=`` reaches inductor later, as the graph
      compiles). Without it the weights stay graph inputs: nothing is frozen, and inductor neither pre-packs
      dense weights nor offers its weight-only GEMM templates (they need the weight as a constant).
    * Freezing constant-folds whatever depends on constants only: a layer that dequantizes its codes in the
      graph (the portable path) would get a full-precision copy of its weight as a constant. Nodes that read
      1-byte integer tensors are kept out of folding, so codes stay codes.
    * :func:`woq_templates` answers True while tracing.

    Only a compilation reads the first two, so where Dynamo runs compile callbacks (``torch._dynamo.
    callback_handler``) they are set when a compilation starts inside such a call and restored when it ends
    (:func:`_compile_start`); a call notes that it runs (a thread's list) and sets the third, which the compiled
    code is guarded on (a global read while tracing: without it at a call, every call compiled again). Setting
    the first two around every call cost 20 us of a compiled 4096x4096 one-row call on the AMX Xeon (its caches
    cold from the weight's stream: inductor's config setter, the folder's class attribute).
    """

    __slots__ = ("freezing", "woq", "blocking", "saved")

    def __init__(self, freezing: bool, woq: bool, blocking: str | None = None):
        self.freezing, self.woq, self.blocking, self.saved = freezing, woq, blocking, None

    def __enter__(self):
        global _WOQ_TEMPLATES
        grad = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        if not self.freezing:
            self.saved = (grad,)
            return self
        if _callbacks_on():
            calls = _running()
            calls.append((self.woq, self.blocking))
            # (the flag at every call: Dynamo guards the compiled code on the global it read while tracing)
            self.saved = (grad, calls, _WOQ_TEMPLATES)
            _WOQ_TEMPLATES = self.woq
            return self
        folder, config = _constant_folder(), _INDUCTOR[0]
        orig = folder.__dict__["is_impure"]
        self.saved = (grad, orig, _WOQ_TEMPLATES, config.freezing, config.cpp.gemm_cache_blocking)
        folder.is_impure = _keeping_codes(orig)
        _WOQ_TEMPLATES = self.woq
        config.freezing = True  # plain assignment: config.patch costs ~20 us per call
        if self.blocking is not None:
            config.cpp.gemm_cache_blocking = self.blocking
        return self

    def __exit__(self, *exc):
        global _WOQ_TEMPLATES
        saved = self.saved
        if len(saved) == 3:
            saved[1].pop()
            _WOQ_TEMPLATES = saved[2]
        elif len(saved) > 3:
            _INDUCTOR[0].freezing = saved[3]
            _INDUCTOR[0].cpp.gemm_cache_blocking = saved[4]
            _WOQ_TEMPLATES = saved[2]
            _constant_folder().is_impure = saved[1]
        torch._C._set_grad_enabled(saved[0])
        return False


# per thread: .running, (woq flag, blocking) of the compiled calls in progress (innermost last)
_CALLS = threading.local()
_SAVED: list = []  # what a compilation started inside such a call changed, until it ends
_HANDLER: list = []  # [Dynamo's callback handler, or None where this torch has none], once looked up


def _callbacks_on() -> bool:
    """Whether :func:`_compile_start` / :func:`_compile_end` are registered with Dynamo (registered here where
    they are not: at the first call, and after ``torch._dynamo.reset()``, which clears every callback); False
    where this torch has no compile callbacks (then :class:`_tracing_setup` sets everything around each call)."""
    if not _HANDLER:
        _constant_folder()  # (inductor's config loaded, and Dynamo with it)
        handler = getattr(torch._dynamo, "callback_handler", None)
        ok = handler is not None and isinstance(getattr(handler, "start_callbacks", None), list)
        _HANDLER.append(handler if ok and hasattr(handler, "register_start_callback") else None)
    handler = _HANDLER[0]
    if handler is None:
        return False
    if _compile_start not in handler.start_callbacks:
        with _INSTALL:
            if _compile_start not in handler.start_callbacks:
                handler.register_start_callback(_compile_start)
                handler.register_end_callback(_compile_end)
    return True


def _running() -> list:
    calls = getattr(_CALLS, "running", None)
    if calls is None:
        calls = _CALLS.running = []
    return calls


def _compile_start(*_args) -> None:
    """Dynamo's compile-start callback: inside a ``qtorch.compile`` call of this thread, freezing, the codes
    kept out of folding and the call's template blocking (where it has one) for the compilation (restored by
    :func:`_compile_end`)."""
    calls = getattr(_CALLS, "running", None)
    if not calls or _SAVED:
        return
    folder, config = _constant_folder(), _INDUCTOR[0]
    orig = folder.__dict__["is_impure"]
    _SAVED.append((orig, config.freezing, config.cpp.gemm_cache_blocking))
    folder.is_impure = _keeping_codes(orig)
    config.freezing = True
    blocking = calls[-1][1]
    if blocking is not None:
        config.cpp.gemm_cache_blocking = blocking


def _compile_end(*_args) -> None:
    """Dynamo's compile-end callback (in the thread whose compilation ends last, where several ran at once)."""
    if not _SAVED:
        return
    saved = _SAVED.pop()
    _INDUCTOR[0].freezing = saved[1]
    _INDUCTOR[0].cpp.gemm_cache_blocking = saved[2]
    _constant_folder().is_impure = saved[0]


_INSTALL = threading.Lock()


_FOLDER: list = []
_INDUCTOR: list = []  # torch._inductor.config, once _constant_folder has loaded inductor


def _constant_folder():
    """inductor's ``ConstantFolder`` class (imported at the first compiled call: importing inductor loads Dynamo,
    about 1 s that ``import qtorch`` no longer spends)."""
    if not _FOLDER:
        import torch._inductor.config as config
        from torch._inductor.constant_folding import ConstantFolder

        _INDUCTOR.append(config)
        _FOLDER.append(ConstantFolder)
    return _FOLDER[0]


@functools.lru_cache(maxsize=None)
def _keeping_codes(is_impure):
    """``is_impure`` of inductor's constant folder, also true for a node that reads a weight's codes."""
    def keeping_codes(folder, node):
        return is_impure(folder, node) or (node.op == "call_function" and _reads_codes(folder, node))
    return keeping_codes


def _device_type(model) -> str:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device.type
    return "cpu"


#: layouts whose op inductor has weight-only GEMM templates for on CPU (AMX / AVX-512), most preferred first
TEMPLATE_LAYOUTS = ("int8pack", "int4pack")
#: qtorch's own layouts: their custom ops stay opaque to inductor (``vnni`` where the CPU has AVX512-VNNI: the
#: fastest one-row path there, 4096 x 4096 bfloat16 0.23 ms eager against 0.49 for int4pack's kernel; ``vnni8``
#: where it has AMX-INT8: 8-bit prompts of a few rows from the codes as stored)
OWN_LAYOUTS = ("blocked", "vnni", "vnni8")


#: the row counts a compiled model's layouts are probed at when ``rows`` is not given: one row and a 128-row prompt
#: (each count compiles one probe per layout: a third count, as eager layout decisions time, would cost a third more
#: compile time)
DEFAULT_ROWS = (1, 128)


def _rows(rows) -> tuple:
    """``rows`` of :func:`compile` as a sorted tuple of distinct ints >= 1 (None: :data:`DEFAULT_ROWS`)."""
    if rows is None:
        return DEFAULT_ROWS
    seq = (rows,) if isinstance(rows, int) else rows
    try:
        seq = tuple(seq)
    except TypeError:
        raise TypeError(f"rows must be an int or a sequence of ints, got {type(rows).__name__}") from None
    if not seq or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in seq):
        raise ValueError(f"rows must be ints >= 1 (the rows of the calls the model will run), got {rows!r}")
    return tuple(sorted(set(seq)))


def _candidates(weight, dtype) -> list:
    """Names of the layouts a compiled layer of ``weight`` may hold, in the unmeasured order
    (:func:`qtorch.layouts.default_policy`): the first template layout that can hold it and qtorch's own layouts
    (:data:`OWN_LAYOUTS`), each where eligible. Empty without a template layout: nothing to choose, the layer keeps
    its layout."""
    from . import layouts

    found = layouts.eligible(weight.spec, weight.device, dtype)
    names = [lay.name for lay in found]
    template = next((n for n in TEMPLATE_LAYOUTS if n in names), None)
    if template is None:
        return []
    picked = [lay for lay in found if lay.name == template or lay.name in OWN_LAYOUTS]
    return [lay.name for lay in layouts.default_policy(picked)]


_PROBE_IDS = itertools.count()
#: timing of the compiled probes, per row count: up to this many seconds of calls (rounds of both candidates,
#: alternating) within ``PROBE_ROUNDS``. More than the eager dispatcher's 20 ms: a probe costs seconds of compiling
#: anyway, and a decision timed beside other work took 3 or 4 calls per candidate there, too few to see past the
#: waits for a core (probe calls of 20-45 ms for 1-2 ms kernels at a load of 5 on the 2-core Xeon)
PROBE_BUDGET_S = 0.25
PROBE_ROUNDS = (5, 40)
_PROBE_DISPATCHER: list = [None, None]  # [the process's dispatcher it was made from, the probes' dispatcher]


def probe_dispatcher():
    """The dispatcher that times compiled probes: the process's (:func:`qtorch.autotune.default_dispatcher`:
    its file, clock and measuring switch, so its decisions share the file) with the probes' budget."""
    from . import autotune

    d = autotune.default_dispatcher()
    if _PROBE_DISPATCHER[0] is not d:
        env = {"QTORCH_AUTOTUNE": "1" if d.measuring else "0"}
        _PROBE_DISPATCHER[:] = [d, autotune.Dispatcher(False if d.cache_path is None else d.cache_path, env=env,
                                                       timer=d.timer, budget_s=PROBE_BUDGET_S,
                                                       min_rounds=PROBE_ROUNDS[0], max_rounds=PROBE_ROUNDS[1],
                                                       others_running=d.others_running, evict=d.evict)]
    return _PROBE_DISPATCHER[1]


#: copies of the weight a compiled probe calls in turn at one row, at most (:func:`qtorch.autotune.rotation_copies`
#: below that): one compiled call then runs a layer after layer as a compiled model does, each weight read from
#: memory with the code, the graph's wrapper and x hot. One layer after an eviction of the caches paid the cold
#: Python and wrapper too, ~0.5 ms on the AMX Xeon, which hid the kernels: 4096 x 4096 4-bit bfloat16, int4pack
#: 1.08, vnni 1.21 ms, where vnni's kernel takes 0.42-0.47 ms from memory against int4pack's 0.68-0.71
PROBE_COPIES = 16


def _probe_forward(self, x):
    if x.shape[0] in self.rotate:  # (a shape: Dynamo traces one branch per row count)
        return tuple(layer(x) for layer in self.layers)
    return self.layers[0](x)


def _probe(layer: nn.Module, layout: str, copies: int = 1, rotate: tuple = ()) -> nn.Module:
    """``copies`` copies of ``layer`` (tensors of their own) holding ``layout``, inside a module whose ``forward``
    is a code object of its own: Dynamo keeps compiled code per code object, so probes neither count towards the
    recompile limit of the layer's ``forward`` (8: past it the layer would run eagerly, unnoticed) nor outlive the
    probe. Calls of the row counts in ``rotate`` run every copy in turn (a tuple of their outputs), others the
    first."""
    first = copy.deepcopy(layer)
    if not first.quantized_weight.hold_layout(layout, first.compute_dtype):
        raise ValueError(f"{layout} cannot hold this weight")
    code = _probe_forward.__code__.replace(co_name=f"_probe_forward_{next(_PROBE_IDS)}")
    cls = type("CompileProbe", (nn.Module,), {"forward": types.FunctionType(code, _probe_forward.__globals__)})
    probe = cls()
    probe.layers = nn.ModuleList([first] + [copy.deepcopy(first) for _ in range(copies - 1)])
    probe.rotate = tuple(rotate)
    return probe.eval()


def _compiled_probe(layer: nn.Module, layout: str, rows: tuple, options: dict, copies: int = 1,
                    rotate: tuple = ()) -> "CompiledModule":
    """:func:`_probe` compiled as :func:`compile` compiles the model (the same options, one graph per row count,
    the paths measured for ``rows`` kept); compiles at its first call of each row count."""
    probe = _probe(layer, layout, copies, rotate)
    for m in probe.layers:
        _keep_paths(m, rows)
    return _compile_probe(probe, options, group=False)


def _compile_probe(probe: nn.Module, options: dict, group: bool) -> "CompiledModule":
    """``probe`` compiled with ``options``, whose siblings pass (:data:`qtorch.siblings.PASS`) groups layers that
    read one row only where ``group``: the C++ twins of the inference ops run either way, as in the model (a
    probe of Python ops timed SmolLM2's 192x576 8-bit layer at 65 us a call on ``blocked``, where the model's C++
    op takes 44; ``int8pack`` 35). Another pass in ``options`` (the caller's own) is not run in probes; one set in
    inductor's config is (as in the model)."""
    from .siblings import APART, PASS, SiblingsPass

    passed = options.get("post_grad_custom_post_pass")
    options = {k: v for k, v in options.items() if k != "post_grad_custom_post_pass"}
    if isinstance(passed, SiblingsPass):
        options["post_grad_custom_post_pass"] = PASS if group and passed.group else APART
    return CompiledModule(probe, torch.compile(probe, fullgraph=True, dynamic=False, options=_for_torch(options)),
                          options)


def probe_copies(layer: nn.Module) -> int:
    """Copies a compiled probe of ``layer`` rotates over at one row: enough that each is read from memory
    (:func:`qtorch.autotune.rotation_copies` of its canonical codes), :data:`PROBE_COPIES` at most."""
    from . import autotune

    k = layer.quantized_weight.spec.in_features
    nbytes = layer.quantized_weight.spec.out_features * k * layer.quantized_weight.spec.bits // 8
    return min(PROBE_COPIES, autotune.rotation_copies(nbytes))


def _probe_runs(layer: nn.Module, layout: str, rows: tuple, options: dict, copies: int = 1):
    """``{rows: {"compiled": callable}}`` for :meth:`qtorch.autotune.Dispatcher.choose_layout`: a
    :func:`_compiled_probe` on random inputs of the layer's dtype, its calls at the cold row counts
    (:data:`qtorch.autotune.COLD_ROWS`) over ``copies`` copies (the race's untimed warm-up call of each row count
    compiles). None when the probe cannot be built (that candidate loses)."""
    from . import autotune

    try:
        run = _compiled_probe(layer, layout, rows, options, copies, autotune.COLD_ROWS if copies > 1 else ())
    except Exception:
        return None
    gen = torch.Generator().manual_seed(0)
    k, dtype = layer.in_features, layer.compute_dtype
    xs = {r: torch.randn(r, k, generator=gen).to(dtype) for r in rows}
    return {r: {"compiled": (lambda x=xs[r]: run(x))} for r in rows}


def _keep_paths(layer: nn.Module, rows: tuple) -> None:
    """Run ``layer``'s weight once eagerly per row count (zero inputs): a layout with several paths then keeps the
    measured one for each row bucket (:meth:`qtorch.weight.QuantizedWeight.linear`), which the trace reads; under
    tracing nothing is measured and an unmeasured bucket traces the layout's own path (``numba`` for ``blocked``
    up to 256 rows, where ``amx`` or ``tiles_act`` may be several times faster)."""
    w = layer.quantized_weight
    if not w.layout.tuned:
        return
    with torch.no_grad():
        for r in rows:
            w.linear(torch.zeros(r, w.spec.in_features, dtype=layer.compute_dtype, device=w.device))


def _groups_siblings(options: dict) -> bool:
    """Whether a model compiled with ``options`` runs sibling layers as one call (the siblings pass, grouping)."""
    from .siblings import SiblingsPass

    passed = options.get("post_grad_custom_post_pass")
    return isinstance(passed, SiblingsPass) and passed.group


#: inductor's option for the cache blocking of its C++ GEMM templates (``"Mc,Nc,Kc"``, in register blocks)
BLOCKING_OPTION = "cpp.gemm_cache_blocking"
#: the blockings :func:`choose_blocking` times against inductor's own: K blocks of 8 and 16 register blocks (256
#: and 512 inputs for its AMX micro-kernels, whose blocks hold 32), all of a thread's rows (``Mc``, bounded by them)
#: and one register block of columns a cache block (``Nc``). Inductor sizes K blocks so that the dequantized
#: bfloat16 B block alone fills 80% of L1 (576 inputs at K = 4096 on a 48 KB L1), which leaves the A rows of the
#: block nowhere to stay: AMX Xeon, 4096 x 4096 8-bit bfloat16 at 128 rows, compiled dense 1.00x, inductor's own
#: 0.95-1.04x, 256 inputs 1.04-1.11x, 512 1.00-1.13x (2048 x 5504: 0.88x -> 1.05x; one row unchanged)
TEMPLATE_BLOCKINGS = ("9999,1,8", "9999,1,16")
#: a blocking replaces inductor's own only where the model's request (:data:`qtorch.autotune.REQUEST_CALLS`, summed
#: over its template layers) costs at least this factor less: it applies to every GEMM template of the graph
BLOCKING_TIE = 1.03
#: the name inductor's own blocking races under
OWN_BLOCKING = "inductor"


def choose_blocking(model: nn.Module, rows=None, options: dict | None = None) -> str | None:
    """The cache blocking (a value of inductor's :data:`BLOCKING_OPTION`) a compiled ``model`` should pass, or
    None for inductor's own: measured where the model's quantized layers hold a template layout (``int8pack``,
    ``int4pack``) and ``options`` set none. Per shape group holding one, a compiled probe of a layer with
    inductor's blocking and with each of :data:`TEMPLATE_BLOCKINGS` is timed at ``rows`` by the layout race
    (:meth:`qtorch.autotune.Dispatcher.choose_layout`, kept like the layout decisions: key
    ``layout|NxK|compiled-<scheme>-<layout>-blocking-rows<r+r>|...``); a blocking wins where the request costs,
    summed over the groups' layers, are :data:`BLOCKING_TIE` below inductor's own. The option is global to the
    graph, so one blocking serves the model. Nothing is measured (None) where the dispatcher does not measure or
    inductor's config holds a blocking of the caller's.

    >>> choose_blocking(torch.nn.Sequential(torch.nn.Linear(4, 4))) is None   # no template layer
    True
    """
    from torch._inductor import config

    from . import autotune

    rows = _rows(rows)
    options = compile_options("cpu") if options is None else options
    d = probe_dispatcher()
    if options.get(BLOCKING_OPTION) is not None or config.cpp.gemm_cache_blocking is not None or not d.measuring:
        return None
    names = (OWN_BLOCKING,) + TEMPLATE_BLOCKINGS
    totals = dict.fromkeys(names, 0.0)
    raced = False
    for (n, k, label, dtype), members in layer_groups(model).items():
        lay = members[0].quantized_weight.layout.name
        if lay not in TEMPLATE_LAYOUTS or members[0].quantized_weight.device.type != "cpu":
            continue
        key = autotune.LayoutKey.make(n, k, f"compiled-{label}-{lay}-blocking-rows{'+'.join(map(str, rows))}", dtype)
        copies = probe_copies(members[0])
        probes = {name: (lambda name=name: _probe_runs(members[0], lay, rows, _blocked(options, name), copies))
                  for name in names}
        try:
            d.choose_layout(key, probes, rows=rows, tie=BLOCKING_TIE,
                            calls={r: copies for r in rows if r in autotune.COLD_ROWS})
        except Exception:  # no probe ran: this group says nothing
            continue
        ms = (d.decisions().get(str(key)) or {}).get("ms") or {}
        costs = {name: autotune.request_cost(ms, name, rows) for name in names}
        if any(c is None for c in costs.values()):  # a probe failed: inductor's own holds
            return None
        for name, c in costs.items():
            totals[name] += len(members) * c
        raced = True
    if not raced:
        return None
    best = min(TEMPLATE_BLOCKINGS, key=totals.__getitem__)
    return best if totals[best] * BLOCKING_TIE < totals[OWN_BLOCKING] else None


def _for_torch(options: dict | None) -> dict | None:
    """``options`` as ``torch.compile`` takes them: without :data:`BLOCKING_OPTION`, which its check refuses (a
    string where inductor declares None); :class:`CompiledModule` sets it while its graphs compile."""
    if not options or BLOCKING_OPTION not in options:
        return options
    return {k: v for k, v in options.items() if k != BLOCKING_OPTION}


def _blocked(options: dict, name: str) -> dict:
    """``options`` with the blocking ``name`` (:data:`OWN_BLOCKING`: as they are)."""
    return dict(options) if name == OWN_BLOCKING else {**options, BLOCKING_OPTION: name}


def choose_layouts(model: nn.Module, rows=None, options: dict | None = None, siblings: list | None = None) -> dict:
    """Decide, per quantized layer shape (out x in, scheme, compute dtype), the layout its layers hold in
    compiled inference, then move them; returns ``{"out x in|scheme|dtype": layout name}`` of the shapes that had a
    choice.

    Candidates: the template layout (``int8pack`` / ``int4pack``, whose op inductor has weight-only templates for)
    and qtorch's own (``blocked``, ``vnni``, ``vnni8``: custom ops), where eligible. In order of precedence:
    ``QTORCH_LAYOUT`` where eligible; one candidate: it; ``QTORCH_AUTOTUNE=0``: the first of the static order
    (:func:`qtorch.layouts.default_policy`: the template layout on CPUs other than AVX2, else ``blocked``); else the
    decision kept for this machine, or a measurement: per candidate a probe on copies of a layer's weight
    (:func:`probe_copies` called in turn at one row, one copy at other rows), compiled with ``options`` and timed at
    each of ``rows`` by the layout race of
    :meth:`qtorch.autotune.Dispatcher.choose_layout` (a row count's time is its fastest call, weighted by
    ``autotune.REQUEST_CALLS``, ties within ``autotune.LAYOUT_TIE`` to the static order) within
    :data:`PROBE_BUDGET_S` (:func:`probe_dispatcher`). A probe that fails to build, compile or run loses; if every
    one fails, the static order holds (with a warning). ``siblings``: sets of layers that read the same input
    (:func:`qtorch.sibling_layouts.find_siblings`); the layouts of the shape groups are then settled together,
    each set whose layers all hold ``blocked`` saving what its one call measured against its calls apart
    (:func:`qtorch.sibling_layouts.settle`). Every decision is made before any layer moves.
    """
    from . import autotune, layouts

    rows = _rows(rows)
    options = compile_options("cpu") if options is None else options
    forced = autotune.default_dispatcher().forced_layout
    d = probe_dispatcher()
    if forced is not None:
        layouts.get(forced)  # an unknown name is an error, as for the eager choice
    groups = layer_groups(model)
    picks, raced = {}, {}  # raced: group -> (its decision's key, the candidates)
    for (n, k, label, dtype), members in groups.items():
        w = members[0].quantized_weight
        names = _candidates(w, dtype)
        if forced is not None and forced in [lay.name for lay in layouts.eligible(w.spec, w.device, dtype)]:
            pick = forced
        elif not names:
            continue
        elif len(names) == 1 or not d.measuring:
            pick = names[0]
        else:
            key = autotune.LayoutKey.make(n, k, f"compiled-{label}-rows{'+'.join(map(str, rows))}", dtype)
            copies = probe_copies(members[0])
            probes = {name: (lambda name=name: _probe_runs(members[0], name, rows, options, copies))
                      for name in names}
            try:
                pick = d.choose_layout(key, probes, rows=rows, cheaper_ties=False,
                                       calls={r: copies for r in rows if r in autotune.COLD_ROWS})
            except Exception as e:  # every probe failed: nothing was measured
                warnings.warn(f"qtorch.compile: no layout probe of {key} ran ({type(e).__name__}: {e}); "
                              f"{names[0]} (static order)", RuntimeWarning, stacklevel=3)
                pick = names[0]
            raced[(n, k, label, dtype)] = (key, names)
        picks[(n, k, label, dtype)] = pick
    if siblings and forced is None and d.measuring and _groups_siblings(options):
        from . import sibling_layouts

        known = d.decisions()
        costs = {}  # group -> {layout: a request's cost of one layer, ms}, as its race timed it
        for g, (key, names) in raced.items():
            ms = (known.get(str(key)) or {}).get("ms") or {}
            costs[g] = {name: c for name in names if (c := autotune.request_cost(ms, name, rows)) is not None}
        picks = sibling_layouts.settle(groups, costs, picks, siblings, options, rows)
    decided = {}
    for (n, k, label, dtype), pick in picks.items():
        for m in groups[(n, k, label, dtype)]:
            m.quantized_weight.hold_layout(pick, m.compute_dtype)
        decided[f"{n}x{k}|{label}|{str(dtype).removeprefix('torch.')}"] = pick
    for members in groups.values():
        for m in members:
            _keep_paths(m, rows)
    return decided


def compile(model, *, fullgraph: bool = False, dynamic: bool | None = False, autotune: bool = True,
            backend: str = "inductor", rows=None) -> CompiledModule:
    """Compile ``model`` (any ``nn.Module``, quantized layers included) for inference.

    Puts ``model`` in eval mode, and returns a :class:`CompiledModule` whose forward runs under ``no_grad``
    through ``torch.compile(model, backend="inductor", options=compile_options(...))``. Global torch and
    inductor settings are not modified. ``dynamic=False`` (the default) compiles once per input shape, so each
    number of rows gets its own kernel choice; pass ``dynamic=None`` to let torch decide. ``autotune=False``
    skips max-autotune (much faster compilation, e.g. for tests) and the layout choice.

    ``rows``: the rows of the calls the model will run (an int or a sequence; default ``(1, 128)``, decoding steps
    and prompt chunks weighed as a request, as the eager layout choice does). With max-autotune on CPU, for a model
    with quantized layers, the first call runs the model eagerly (its output is that call's), which shows the
    layers that read the same input; then the layout of each quantized layer shape is chosen for ``rows`` by
    measurement (:func:`choose_layouts`, those sets weighed together), and every quantized layer runs each row
    count once eagerly so that the trace takes the path measured for it. The graphs compile from the second call.
    Where nothing is measured (``QTORCH_AUTOTUNE=0``, ``QTORCH_LAYOUT``), the layouts are chosen here, at once.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"qtorch.compile needs an nn.Module, got {type(model).__name__}")
    rows = _rows(rows)
    model.eval()
    device_type = _device_type(model)
    opts = compile_options(device_type, autotune=autotune) if backend == "inductor" else None
    choose = opts and opts.get("max_autotune") and device_type == "cpu" and layer_groups(model)
    if choose:
        from . import autotune

        d = autotune.default_dispatcher()
        if d.forced_layout is not None or not d.measuring:  # nothing is measured: no sets to see, choose now
            choose_layouts(model, rows, opts)
            choose = False
    def recompile(options):
        return torch.compile(model, fullgraph=fullgraph, dynamic=dynamic, backend=backend, options=_for_torch(options))

    return CompiledModule(model, recompile(opts), opts, rows if choose else None, recompile)
