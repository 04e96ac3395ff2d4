// qtorch's decoding ops for compiled graphs, as C++ kernels: the one-row launch of a blocked layer (or of two or
// three sibling layers), or of a vnni or vnni8 layer, without the Python between the graph and the kernel.
//
// Each op has the schema of a Python op (``qtorch::<name>_infer`` or ``qtorch::blocked_siblings<n>``) and the same
// numbers: a call that Python registered a native launch for (qtorch/native_ops.py: the layers' addresses, group
// size, width, row dtype, dot flag and K as the key, the launch's state as the value) runs that launch here (the
// numba cfunc qtorch._launch compiled, by its address); every other call, and any launch that cannot go natively
// now, is handed to the Python op through the dispatcher, which handles them all.
//
// The team's state (qcore._team) is shared through an int64 array Python owns: open (no thread cap, no forked
// child), the end and size of the last native launch, and the note of a late launch, which closes the gate until
// Python has learnt from it.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <ctime>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace {

using Launch = int64_t (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);

// the gate's slots (qcore._team.NATIVE_* must match)
enum {
  OPEN, LAST_END_NS, LAST_SIZE, NOTE, NOTE_THREADS, NOTE_STARVED, NOTE_WALL_NS, NOTE_WAITED, LATE_NS, NOTE_CLEAN,
  HEADER, FIRST_IN, FIRST_OUT, LAST_OUT
};

Launch g_launch = nullptr;
int64_t* g_gate = nullptr;
int64_t g_enabled = 1;  // 0: every call to the Python op (a comparison of both in one process)
int64_t g_runs = 0;     // launches run here (tests, benchmarks: which way the calls went)
int64_t g_first_block = 0;  // where a launch's state holds its first block's address (int64 slots)
std::mutex g_mutex;
std::map<std::vector<int64_t>, int64_t> g_launches;  // key -> the launch's state address

int64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);  // time.monotonic's clock
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

int64_t kind_of(at::ScalarType t) {  // qtorch.gemv.TORCH_KINDS
  switch (t) {
    case at::ScalarType::Float: return 0;
    case at::ScalarType::BFloat16: return 1;
    case at::ScalarType::Half: return 2;
    default: return -1;
  }
}

// Whether the threads of the launch ``state`` that ran out of chunks waited for a straggler longer than half the
// time all of them worked (qcore._team._waited on its first block's trailer; few chunks: never).
bool waited(int64_t state, int64_t nthreads) {
  const int64_t* block = reinterpret_cast<const int64_t*>(reinterpret_cast<const int64_t*>(state)[g_first_block]);
  const int64_t nchunks = block[1];
  if (nchunks < 4 * nthreads) return false;
  const int64_t* trailer = block + g_gate[HEADER] + nchunks;
  const int64_t first_in = trailer[g_gate[FIRST_IN]], first_out = trailer[g_gate[FIRST_OUT]];
  const int64_t last_out = trailer[g_gate[LAST_OUT]];
  if (!(first_in <= first_out && first_out <= last_out) || first_in == last_out) return false;
  return 2 * (last_out - first_out) > first_out - first_in;
}

// Run the launch ``state`` with the row at ``xa`` and the outputs at ``o``; its first block's starved count, or -1
// where it cannot go now (one thread, or another thread holds it). Keeps the team's state: the last launch's end
// and size, and the note of a late one.
int64_t run_launch(int64_t state, int64_t xa, const int64_t* o) {
  const int64_t nthreads = at::get_num_threads();
  if (nthreads < 2) return -1;
  const int64_t begin = now_ns();
  const int64_t starved = g_launch(state, xa, o[0], o[1], o[2], nthreads);
  if (starved < 0) return -1;  // another thread holds this launch
  const int64_t end = now_ns();
  __atomic_fetch_add(&g_runs, 1, __ATOMIC_RELAXED);
  g_gate[LAST_END_NS] = end;
  g_gate[LAST_SIZE] = nthreads;
  if (end - begin >= g_gate[LATE_NS]) {
    // a late launch that starved a thread or kept threads waiting: Python learns from it (a thread cap) before the
    // next launch. (Without either, its note would change nothing while the gate is open: no cap, level 0.)
    const bool kept_waiting = waited(state, nthreads);
    if (starved > 0 || kept_waiting || g_gate[NOTE_CLEAN]) {
      g_gate[NOTE_THREADS] = nthreads;
      g_gate[NOTE_STARVED] = starved;
      g_gate[NOTE_WALL_NS] = end - begin;
      g_gate[NOTE_WAITED] = kept_waiting;
      g_gate[NOTE] = 1;
      __atomic_store_n(&g_gate[OPEN], 0, __ATOMIC_RELEASE);
    }
  }
  return starved;
}

// The registered launch of ``key``, or 0.
int64_t lookup(const std::vector<int64_t>& key) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_launches.find(key);
  return it == g_launches.end() ? 0 : it->second;
}

// The row ``x`` of a call, where a launch may read it: one contiguous row of a float dtype on the CPU, no gradient,
// the gate open. Its kind (qtorch.gemv.TORCH_KINDS), or -1.
int64_t row_kind(const at::Tensor& x) {
  if (__atomic_load_n(&g_gate[OPEN], __ATOMIC_ACQUIRE) != 1 || x.dim() != 2 || x.size(0) != 1 ||
      !x.device().is_cpu() || x.stride(1) != 1 || x.requires_grad()) {
    return -1;
  }
  return kind_of(x.scalar_type());
}

bool ready(torch::jit::Stack* stack, size_t nargs) {
  return g_launch != nullptr && g_gate != nullptr && __atomic_load_n(&g_enabled, __ATOMIC_RELAXED) &&
         stack->size() >= nargs;
}

// The launch registered for the blocked op's call on ``stack`` (``layers`` layers; ``dot``: the dot flag, -1 where
// it is the last argument), run and its output pushed; false (the stack untouched) where there is none or it
// cannot run now.
bool try_native(torch::jit::Stack* stack, int64_t layers, int64_t dot) {
  const size_t nargs = 1 + 3 * layers + 2 + layers + (dot < 0 ? 1 : 0);
  if (!ready(stack, nargs)) return false;
  auto args = stack->end() - nargs;
  const at::Tensor& x = args[0].toTensor();
  const int64_t kind = row_kind(x);
  if (kind < 0) return false;
  const int64_t d = dot < 0 ? static_cast<int64_t>(args[nargs - 1].toBool()) : dot;
  std::vector<int64_t> key{layers, d, args[1 + 3 * layers].toInt(), args[2 + 3 * layers].toInt(), kind, x.size(1)};
  int64_t total = 0;
  for (int64_t i = 0; i < layers; ++i) {
    for (int64_t j = 1; j <= 3; ++j) {
      const at::Tensor& t = args[3 * i + j].toTensor();
      key.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
    }
    const int64_t n = args[3 + 3 * layers + i].toInt();
    key.push_back(n);
    total += n;
  }
  const int64_t state = lookup(key);
  if (state == 0) return false;
  at::Tensor out = at::empty({1, total}, x.options());
  const int64_t step = out.element_size();
  int64_t o[3] = {reinterpret_cast<int64_t>(out.data_ptr()), 0, 0};
  for (int64_t i = 1; i < layers; ++i) o[i] = o[i - 1] + args[3 + 3 * layers + i - 1].toInt() * step;
  if (run_launch(state, reinterpret_cast<int64_t>(x.data_ptr()), o) < 0) return false;
  torch::jit::drop(*stack, nargs);
  torch::jit::push(*stack, std::move(out));
  return true;
}

// The same for the ops of one layer whose launch reads no group size, width or dot flag: the vnni layout's (x,
// qweight, scale, zero_point, out_features; ``tag`` 0) and the vnni8 layout's (x, qweight, scale, out_features;
// ``tag`` -1), keyed by the tag, the row's kind, K, the tensors' addresses and the output width. Their kernels
// report a row holding a NaN or an infinity in the chunks' results; such a call goes to the Python op.
bool try_row_op(torch::jit::Stack* stack, size_t nargs, int64_t tag) {
  if (!ready(stack, nargs)) return false;
  auto args = stack->end() - nargs;
  const at::Tensor& x = args[0].toTensor();
  const int64_t kind = row_kind(x);
  if (kind < 0) return false;
  const int64_t n = args[nargs - 1].toInt();
  std::vector<int64_t> key{tag, kind, x.size(1)};
  for (size_t j = 1; j + 1 < nargs; ++j) key.push_back(reinterpret_cast<int64_t>(args[j].toTensor().data_ptr()));
  key.push_back(n);
  const int64_t state = lookup(key);
  if (state == 0) return false;
  at::Tensor out = at::empty({1, n}, x.options());
  const int64_t o[3] = {reinterpret_cast<int64_t>(out.data_ptr()), 0, 0};
  if (run_launch(state, reinterpret_cast<int64_t>(x.data_ptr()), o) < 0) return false;
  const int64_t* block = reinterpret_cast<const int64_t*>(reinterpret_cast<const int64_t*>(state)[g_first_block]);
  for (int64_t i = 0; i < block[1]; ++i) {
    if (block[g_gate[HEADER] + i] != 0) return false;  // x not finite
  }
  torch::jit::drop(*stack, nargs);
  torch::jit::push(*stack, std::move(out));
  return true;
}

// One boxed kernel per op (``Id`` keeps each op's fallback its own): the launch where one is registered, else the
// Python op of the same schema called with the same stack.
template <int64_t Layers, int64_t Dot, int Id>
void kernel(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  if (Layers <= 0 ? try_row_op(stack, Layers == 0 ? 5 : 4, Layers) : try_native(stack, Layers, Dot)) return;
  static const c10::OperatorHandle fallback = [&op] {
    std::string name = op.schema().name();  // qtorch::<fallback>_native
    name = name.substr(0, name.size() - 7);
    return c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "");
  }();
  fallback.callBoxed(stack);
}

}  // namespace

extern "C" {

// the launch cfunc's address, the gate's, and the slot of a launch's state that holds its first block; once
void qtorch_native_setup(int64_t launch, int64_t gate, int64_t first_block) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_launch = reinterpret_cast<Launch>(launch);
  g_gate = reinterpret_cast<int64_t*>(gate);
  g_first_block = first_block;
}

// a launch for the key (its ``n`` int64 at ``key``); a later one for the same key replaces it
void qtorch_native_register(const int64_t* key, int64_t n, int64_t state) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_launches[std::vector<int64_t>(key, key + n)] = state;
}

// forget every key of the launch ``state`` (before its memory goes); the number forgotten
int64_t qtorch_native_forget(int64_t state) {
  std::lock_guard<std::mutex> lock(g_mutex);
  int64_t gone = 0;
  for (auto it = g_launches.begin(); it != g_launches.end();) {
    if (it->second == state) {
      it = g_launches.erase(it);
      ++gone;
    } else {
      ++it;
    }
  }
  return gone;
}

// 1: registered launches run here; 0: every call goes to the Python op. The previous setting.
int64_t qtorch_native_enable(int64_t on) { return __atomic_exchange_n(&g_enabled, on ? 1 : 0, __ATOMIC_RELAXED); }

int64_t qtorch_native_runs() { return __atomic_load_n(&g_runs, __ATOMIC_RELAXED); }

int64_t qtorch_native_count() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return static_cast<int64_t>(g_launches.size());
}

}  // extern "C"

TORCH_LIBRARY_FRAGMENT(qtorch, m) {
#define QTORCH_SINGLE "(Tensor x, Tensor qweight, Tensor scale, Tensor zero_point, int group_size, int bits, " \
                      "int out_features) -> Tensor"
  m.def("gemm_blocked_infer_native" QTORCH_SINGLE);
  m.def("int8dot_blocked_infer_native" QTORCH_SINGLE);
  m.def("bf16dot_blocked_infer_native" QTORCH_SINGLE);
  m.def("blocked_siblings2_native(Tensor x, Tensor qweight0, Tensor scale0, Tensor zero_point0, Tensor qweight1, "
        "Tensor scale1, Tensor zero_point1, int group_size, int bits, int out_features0, int out_features1, "
        "bool dot) -> Tensor");
  m.def("blocked_siblings3_native(Tensor x, Tensor qweight0, Tensor scale0, Tensor zero_point0, Tensor qweight1, "
        "Tensor scale1, Tensor zero_point1, Tensor qweight2, Tensor scale2, Tensor zero_point2, int group_size, "
        "int bits, int out_features0, int out_features1, int out_features2, bool dot) -> Tensor");
  m.def("vnni_linear_infer_native(Tensor x, Tensor qweight, Tensor scale, Tensor zero_point, int out_features) "
        "-> Tensor");
  m.def("vnni8_linear_infer_native(Tensor x, Tensor qweight, Tensor scale, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(qtorch, CPU, m) {
  m.impl("gemm_blocked_infer_native", torch::CppFunction::makeFromBoxedFunction<&kernel<1, 0, 0>>());
  m.impl("int8dot_blocked_infer_native", torch::CppFunction::makeFromBoxedFunction<&kernel<1, 1, 1>>());
  m.impl("bf16dot_blocked_infer_native", torch::CppFunction::makeFromBoxedFunction<&kernel<1, 1, 2>>());
  m.impl("blocked_siblings2_native", torch::CppFunction::makeFromBoxedFunction<&kernel<2, -1, 3>>());
  m.impl("blocked_siblings3_native", torch::CppFunction::makeFromBoxedFunction<&kernel<3, -1, 4>>());
  m.impl("vnni_linear_infer_native", torch::CppFunction::makeFromBoxedFunction<&kernel<0, 0, 5>>());
  m.impl("vnni8_linear_infer_native", torch::CppFunction::makeFromBoxedFunction<&kernel<-1, 0, 6>>());
}
