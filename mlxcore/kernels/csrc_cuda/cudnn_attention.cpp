// nanobind module `_mlxflow_cuda`: causal / full flash attention for MLX-CUDA through cuDNN's
// frontend, with the causal mask aligned top-left (query i sees keys j <= i).
//
// Why not mx.fast.scaled_dot_product_attention: MLX-CUDA builds the same cuDNN graph but always
// asks for a bottom-right causal mask, and for square attention (T == S, every training step)
// cuDNN then runs its backward kernel much slower than for the identical top-left mask (see the
// README, "Attention through our own cuDNN graph"). The two masks agree whenever T == S; the
// Python layer (mlxcore/kernels/cuda_attention.py) only sends such calls here.
//
// The ops build MLX graph nodes (custom Primitives) like mlx::core ops do: they work under
// mx.compile, and the forward's vjp() is a second node, so nn.value_and_grad differentiates
// through it. Everything a node does on the GPU follows MLX-CUDA's own cuDNN attention
// (mlx/backend/cuda/scaled_dot_product_attention.cpp), so that the only difference is the mask:
// - memory: outputs and workspace are stream-ordered device memory from MLX's allocator (see
//   `allocate`), counted in mx.get_peak_memory like any MLX output;
// - execution: cuDNN populates a CUDA graph through its native graph API (plans restricted to
//   those that support it), later calls only update its pointers, and the graph is added to
//   MLX-CUDA's command graph as a child node; no stream capture;
// - tensors: MLX's stride normalisation and the inputs' alignment.
#include <cuda_runtime.h>
#include <cudnn.h>
#include <cudnn_frontend.h>
#include <dlfcn.h>
#include <execinfo.h>
#include <nanobind/nanobind.h>

#include <algorithm>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "mlx/array.h"
#include "mlx/backend/cuda/device.h"
#include "mlx/backend/cuda/utils.h"
#include "mlx/fast.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace nb = nanobind;
namespace fe = cudnn_frontend;
namespace mx = mlx::core;
using namespace nb::literals;

namespace {

enum Uid : int64_t { Q = 1, K, V, SCALE, O, STATS, DQ, DK, DV, DO };

// MLXFLOW_CUDA_ATTENTION_TRACE=1: each step of building and running the graphs on stderr, flushed,
// and a native backtrace (library + offset, for addr2line) if the process crashes.
bool tracing() {
  static const bool on = [] {
    const char* v = std::getenv("MLXFLOW_CUDA_ATTENTION_TRACE");
    return v != nullptr && *v != '\0' && std::string(v) != "0";
  }();
  return on;
}

void trace(const char* step) {
  if (tracing()) {
    std::fprintf(stderr, "[mlxflow cudnn attention] %s\n", step);
    std::fflush(stderr);
  }
}

struct sigaction previous_segv, previous_bus;

void on_crash(int sig, siginfo_t* info, void*) {
  void* frames[64];
  int n = backtrace(frames, 64);
  dprintf(2, "[mlxflow cudnn attention] signal %d at address %p; native frames (addr2line -f -C -e LIB OFFSET):\n",
          sig, info->si_addr);
  for (int i = 0; i < n; ++i) {
    Dl_info dl;
    if (dladdr(frames[i], &dl) != 0 && dl.dli_fname != nullptr)
      dprintf(2, "  #%d %s +0x%lx %s\n", i, dl.dli_fname,
              static_cast<unsigned long>(static_cast<char*>(frames[i]) - static_cast<char*>(dl.dli_fbase)),
              dl.dli_sname != nullptr ? dl.dli_sname : "");
    else
      dprintf(2, "  #%d %p\n", i, frames[i]);
  }
  // then whatever was installed before (Python's faulthandler prints the Python stack)
  sigaction(sig, sig == SIGSEGV ? &previous_segv : &previous_bus, nullptr);
  raise(sig);
}

void install_crash_report() {
  void* warm[1];
  backtrace(warm, 1);  // loads libgcc's unwinder now, not inside the handler
  struct sigaction sa = {};
  sa.sa_sigaction = on_crash;
  sa.sa_flags = SA_SIGINFO;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &previous_segv);
  sigaction(SIGBUS, &sa, &previous_bus);
}

[[noreturn]] void fail(const std::string& what) {
  throw std::runtime_error("[mlxflow cudnn attention] " + what);
}

void check(fe::error_t e, const char* step) {
  trace(step);
  if (e.is_bad()) fail(std::string(step) + ": " + e.get_message());
}

fe::DataType_t cudnn_type(mx::Dtype t) {
  if (t == mx::bfloat16) return fe::DataType_t::BFLOAT16;
  if (t == mx::float16) return fe::DataType_t::HALF;
  if (t == mx::float32) return fe::DataType_t::FLOAT;
  fail("only bfloat16 and float16 are supported");
}

// A tensor as cuDNN reads it: dims, strides (elements), dtype.
struct Layout {
  std::vector<int64_t> dims, strides;
  mx::Dtype dtype = mx::float32;
  bool row_contiguous = true;
};

// An array's layout. MLX gives a size-1 dimension any stride, cuDNN infers contiguity from
// them: a row-contiguous array's size-1 dimensions get the stride their neighbour implies (as
// MLX-CUDA normalises them for its own cuDNN graphs).
Layout layout_of(const mx::array& a) {
  Layout l{{a.shape().begin(), a.shape().end()}, {a.strides().begin(), a.strides().end()}, a.dtype(),
           static_cast<bool>(a.flags().row_contiguous)};
  if (l.row_contiguous)
    for (int i = static_cast<int>(a.ndim()) - 2; i >= 0; --i)
      if (l.dims[i] == 1) l.strides[i] = l.dims[i + 1] * l.strides[i + 1];
  return l;
}

// A new row-contiguous array of `shape`.
Layout row_major(const mx::Shape& shape, mx::Dtype dtype) {
  Layout l{{shape.begin(), shape.end()}, std::vector<int64_t>(shape.size()), dtype, true};
  int64_t stride = 1;
  for (int i = static_cast<int>(shape.size()) - 1; i >= 0; --i) {
    l.strides[i] = stride;
    stride *= shape[i];
  }
  return l;
}

// A new output of `shape` laid out as `like` is (the same order of strides), as MLX-CUDA lays
// out its attention outputs: a q that is a transposed view of [B, T, H, D] gives an output that
// the caller's transpose + reshape back to [B, T, H * D] reads without a copy.
Layout layout_like(const mx::Shape& shape, mx::Dtype dtype, const mx::array& like) {
  if (like.flags().row_contiguous) return row_major(shape, dtype);
  Layout l{{shape.begin(), shape.end()}, std::vector<int64_t>(shape.size()), dtype, false};
  std::vector<int> order(shape.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    auto sa = like.strides(a) > 0 ? like.strides(a) : 1;
    auto sb = like.strides(b) > 0 ? like.strides(b) : 1;
    return sa < sb;
  });
  int64_t stride = 1;
  for (int i : order) {
    l.strides[i] = stride;
    stride *= shape[i];
  }
  return l;
}

// cuDNN's flash kernels read 16-byte vectors along the head dimension.
void require_layout(const mx::array& a, const char* name) {
  auto addr = reinterpret_cast<uintptr_t>(mx::gpu_ptr<void>(a));
  if (a.strides(-1) != 1 || addr % 16 != 0) {
    std::string st;
    for (auto x : a.strides()) st += (st.empty() ? "" : ", ") + std::to_string(x);
    fail(std::string(name) + " must have a unit stride along the head dimension and 16-byte aligned data (strides " +
         st + ", address % 16 = " + std::to_string(addr % 16) + ")");
  }
}

// Gives each array in `arrays` fresh memory, row-contiguous in its own shape and dtype, the way
// MLX-CUDA allocates every output: stream-ordered device memory from its pool (cu::malloc_async),
// counted in its active and peak memory. That function is not exported from libmlx.so, and
// mx::allocator::malloc, which is, returns managed memory (and moves a cached device buffer it
// reuses to managed memory, a copy). So we run the primitive of an empty mx::fast::cuda_kernel
// (public API): its eval_gpu allocates its outputs with cu::malloc_async, registers them with
// the encoder and launches a kernel that does nothing.
void allocate(mx::Stream s, const mx::array& any_input, std::vector<mx::array>& arrays) {
  static std::mutex mu;
  static auto* kernels = new std::unordered_map<std::string, std::shared_ptr<mx::Primitive>>();
  std::shared_ptr<mx::Primitive> kernel;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto key = std::to_string(s.device.index) + ":" + std::to_string(s.index) + ":" +
               std::to_string(arrays.size());
    auto it = kernels->find(key);
    if (it == kernels->end()) {
      trace("allocation kernel");
      std::vector<std::string> names;
      for (size_t i = 0; i < arrays.size(); ++i) names.push_back("out" + std::to_string(i));
      auto fn = mx::fast::cuda_kernel("mlxflow_allocate_" + std::to_string(arrays.size()), {"x"},
                                      names, "", "", false, 0);
      auto made = fn({any_input}, std::vector<mx::Shape>(arrays.size(), mx::Shape{1}),
                     std::vector<mx::Dtype>(arrays.size(), mx::uint8), {1, 1, 1}, {1, 1, 1}, {},
                     std::nullopt, false, s);
      it = kernels->emplace(key, made[0].primitive_ptr()).first;
    }
    kernel = it->second;
  }
  kernel->eval_gpu({any_input}, arrays);
}

// A flat buffer for `count` elements (to be allocated by `allocate`).
mx::array buffer_of(size_t count, mx::Dtype dtype) {
  if (count > static_cast<size_t>(INT32_MAX)) fail("an output or workspace of more than 2^31 elements");
  return mx::array({static_cast<int>(count)}, dtype, nullptr, {});
}

// `out` laid out as `l` in `buffer`'s memory.
void adopt(mx::array& out, const mx::array& buffer, const Layout& l) {
  mx::Strides st(l.strides.begin(), l.strides.end());
  out.copy_shared_buffer(buffer, st, {true, l.row_contiguous, false}, out.size());
}

cudnnHandle_t handle_for(mx::cu::CommandEncoder& enc) {
  static std::mutex mu;
  static auto* handles = new std::unordered_map<int, cudnnHandle_t>();  // never destroyed
  std::lock_guard<std::mutex> lock(mu);
  int dev = enc.device().cuda_device();
  auto it = handles->find(dev);
  if (it == handles->end()) {
    trace("cudnnCreate");
    enc.device().make_current();
    cudnnHandle_t h;
    if (cudnnCreate(&h) != CUDNN_STATUS_SUCCESS) fail("cudnnCreate failed");
    it = handles->emplace(dev, h).first;
  }
  return it->second;
}

// A built cuDNN graph, and the CUDA graph it populated (first run) and updates (later runs).
struct Built {
  std::shared_ptr<fe::graph::Graph> graph;
  int64_t workspace = 0;
  cudaGraph_t cuda_graph = nullptr;
  Built() = default;
  Built(const Built&) = delete;
  Built& operator=(const Built&) = delete;
  ~Built() {
    if (cuda_graph != nullptr) cudaGraphDestroy(cuda_graph);
  }
};

// No iostreams here (nor anywhere in this file): a statically linked libstdc++ once crashed at
// this key's ostringstream; see the link flags in _build.py.
std::string key_of(const char* kind, int dev, bool causal, const std::vector<Layout>& layouts) {
  std::string key = std::string(kind) + '|' + std::to_string(dev) + '|' + (causal ? '1' : '0');
  for (const auto& l : layouts) {
    key += '|' + std::to_string(static_cast<int>(l.dtype.val())) + ':';
    for (auto d : l.dims) key += std::to_string(d) + ',';
    key += ':';
    for (auto s : l.strides) key += std::to_string(s) + ',';
  }
  return key;
}

// Built graphs by kind, device, layouts (bounded: a run sees a handful of shapes). The mutex is
// held while a graph is built and run, since a run updates the graph's CUDA graph in place.
std::mutex graphs_mutex;

Built& cached(const std::string& key, const std::function<void(Built&)>& build) {
  static auto* cache = new std::unordered_map<std::string, std::unique_ptr<Built>>();  // never destroyed
  auto it = cache->find(key);
  if (it == cache->end()) {
    if (cache->size() >= 256) cache->clear();
    auto b = std::make_unique<Built>();
    build(*b);
    it = cache->emplace(key, std::move(b)).first;
  }
  return *it->second;
}

std::shared_ptr<fe::graph::Graph> new_graph(mx::Dtype dtype) {
  auto g = std::make_shared<fe::graph::Graph>();
  g->set_io_data_type(cudnn_type(dtype))
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  return g;
}

fe::graph::Tensor_attributes& describe(fe::graph::Tensor_attributes& t, int64_t uid, const Layout& l) {
  return t.set_uid(uid).set_dim(l.dims).set_stride(l.strides).set_data_type(cudnn_type(l.dtype)).set_alignment(16);
}

std::shared_ptr<fe::graph::Tensor_attributes> tensor(fe::graph::Graph& g, const char* name, int64_t uid,
                                                     const Layout& l) {
  auto t = g.tensor(fe::graph::Tensor_attributes().set_name(name));
  describe(*t, uid, l);
  return t;
}

std::shared_ptr<fe::graph::Tensor_attributes> scale_tensor(fe::graph::Graph& g) {
  return g.tensor(fe::graph::Tensor_attributes()
                      .set_name("scale")
                      .set_uid(SCALE)
                      .set_dim({1, 1, 1, 1})
                      .set_stride({1, 1, 1, 1})
                      .set_is_pass_by_value(true)
                      .set_data_type(fe::DataType_t::FLOAT));
}

void finish(fe::graph::Graph& g, cudnnHandle_t h, Built& b) {
  check(g.validate(), "validate");
  try {
    check(g.build_operation_graph(h), "build_operation_graph");
  } catch (const fe::cudnnException& e) {  // not every backend error comes back as an error_t
    fail(std::string("build_operation_graph: ") + e.what());
  }
  check(g.create_execution_plans({fe::HeurMode_t::A}), "create_execution_plans");
  g.select_behavior_notes({fe::BehaviorNote_t::SUPPORTS_CUDA_GRAPH_NATIVE_API});
  check(g.check_support(h), "check_support");
  check(g.build_plans(h), "build_plans");
  check(g.get_workspace_size(b.workspace), "get_workspace_size");
}

// Adds the graph's execution to MLX-CUDA's command graph: cuDNN populates (first run) or updates
// (later runs, new pointers) a CUDA graph, which the encoder adds as a child node.
void run(mx::cu::CommandEncoder& enc, cudnnHandle_t h, Built& b, std::unordered_map<int64_t, void*>& pack,
         void* workspace) {
  enc.device().make_current();
  cudnnSetStream(h, enc.stream());
  if (b.cuda_graph == nullptr) {
    trace("cudaGraphCreate");
    if (cudaGraphCreate(&b.cuda_graph, 0) != cudaSuccess) {
      b.cuda_graph = nullptr;
      fail("cudaGraphCreate failed");
    }
    auto err = b.graph->populate_cuda_graph(h, pack, workspace, b.cuda_graph);
    if (err.is_bad()) {
      cudaGraphDestroy(b.cuda_graph);
      b.cuda_graph = nullptr;
    }
    check(err, "populate_cuda_graph");
  } else {
    check(b.graph->update_cuda_graph(h, pack, workspace, b.cuda_graph), "update_cuda_graph");
  }
  enc.add_graph_node(b.cuda_graph);
  trace("graph node added");
}

// What both primitives share: the scale, the mask, CUDA only, and the end of eval_gpu.
class CudnnPrimitive : public mx::Primitive {
 public:
  CudnnPrimitive(mx::Stream s, float scale, bool causal)
      : mx::Primitive(s), scale_(scale), causal_(causal) {}

  void eval_cpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    fail("this op runs on CUDA only");
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const CudnnPrimitive*>(&other);
    return o != nullptr && std::string(name()) == other.name() && scale_ == o->scale_ &&
           causal_ == o->causal_;
  }

 protected:
  // Memory for `outs` (laid out as `layouts`) and `workspace` bytes, the arrays registered with
  // the encoder, then the graph run with `pack` plus the outputs' and the scale's pointers.
  void execute(mx::cu::CommandEncoder& enc, cudnnHandle_t h, Built& b, const std::vector<mx::array>& in,
               std::vector<mx::array>& outs, const std::vector<Layout>& layouts, const int64_t* out_uids,
               std::unordered_map<int64_t, void*> pack) {
    std::vector<mx::array> memory;
    for (const auto& o : outs) memory.push_back(buffer_of(o.size(), o.dtype()));
    if (b.workspace > 0) memory.push_back(buffer_of((b.workspace + 3) / 4, mx::float32));
    allocate(stream(), in[0], memory);
    for (size_t i = 0; i < outs.size(); ++i) adopt(outs[i], memory[i], layouts[i]);
    trace("memory allocated");
    for (const auto& a : in) enc.set_input_array(a);
    for (const auto& a : outs) enc.set_output_array(a);
    void* workspace = nullptr;
    if (b.workspace > 0) {
      enc.add_temporary(memory.back());
      workspace = mx::gpu_ptr<void>(memory.back());
    }
    for (size_t i = 0; i < outs.size(); ++i) pack[out_uids[i]] = mx::gpu_ptr<void>(outs[i]);
    float scale = scale_;
    pack[SCALE] = &scale;
    run(enc, h, b, pack, workspace);
  }

  float scale_;
  bool causal_;
};

// Inputs (q, k, v, o, stats, dO) -> (dq, dk, dv).
class AttentionVJP : public CudnnPrimitive {
 public:
  using CudnnPrimitive::CudnnPrimitive;

  void eval_gpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) override {
    trace("backward: eval_gpu");
    auto& enc = mx::cu::get_command_encoder(stream());
    const char* names[] = {"q", "k", "v", "o", "stats", "dO"};
    for (int i = 0; i < 6; ++i)
      if (i != 4) require_layout(in[i], names[i]);
    std::vector<Layout> layouts;
    for (const auto& a : in) layouts.push_back(layout_of(a));
    std::vector<Layout> out_layouts;
    for (int i = 0; i < 3; ++i) out_layouts.push_back(layout_like(outs[i].shape(), outs[i].dtype(), in[i]));
    auto h = handle_for(enc);
    std::vector<Layout> all(layouts);
    all.insert(all.end(), out_layouts.begin(), out_layouts.end());
    std::lock_guard<std::mutex> lock(graphs_mutex);
    auto& b = cached(key_of("bwd", enc.device().cuda_device(), causal_, all), [&](Built& built) {
      built.graph = new_graph(in[0].dtype());
      auto& g = *built.graph;
      auto q = tensor(g, "q", Q, layouts[0]), k = tensor(g, "k", K, layouts[1]), v = tensor(g, "v", V, layouts[2]);
      auto o = tensor(g, "o", O, layouts[3]), st = tensor(g, "stats", STATS, layouts[4]);
      auto d_o = tensor(g, "dO", DO, layouts[5]);
      auto opts = fe::graph::SDPA_backward_attributes().set_name("mlxflow_sdpa_backward")
                      .set_attn_scale(scale_tensor(g));
      if (causal_) opts.set_causal_mask(true);
      auto [dq, dk, dv] = g.sdpa_backward(q, k, v, o, d_o, st, opts);
      describe(*dq, DQ, out_layouts[0]).set_output(true);
      describe(*dk, DK, out_layouts[1]).set_output(true);
      describe(*dv, DV, out_layouts[2]).set_output(true);
      finish(g, h, built);
    });
    static constexpr int64_t uids[] = {DQ, DK, DV};
    execute(enc, h, b, in, outs, out_layouts, uids,
            {{Q, mx::gpu_ptr<void>(in[0])}, {K, mx::gpu_ptr<void>(in[1])}, {V, mx::gpu_ptr<void>(in[2])},
             {O, mx::gpu_ptr<void>(in[3])}, {STATS, mx::gpu_ptr<void>(in[4])}, {DO, mx::gpu_ptr<void>(in[5])}});
  }
  const char* name() const override {
    return "MlxflowCudnnAttentionVJP";
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    return {in[0].shape(), in[1].shape(), in[2].shape()};
  }
};

// The layout of a transposed view of row-contiguous [B, T, H, D], made with no copy when `x`
// already is one (the attention inputs and cotangents of every mlx-lm family) and with one copy
// otherwise (a broadcast cotangent, a sliced or otherwise strided array).
mx::array bthd(const mx::array& x, mx::Stream s) {
  return mx::transpose(mx::contiguous(mx::transpose(x, {0, 2, 1, 3}, s), false, s), {0, 2, 1, 3}, s);
}

// Inputs (q, k, v) -> (o, stats float32 [B, H, T, 1]).
class Attention : public CudnnPrimitive {
 public:
  using CudnnPrimitive::CudnnPrimitive;

  void eval_gpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) override {
    trace("forward: eval_gpu");
    auto& enc = mx::cu::get_command_encoder(stream());
    const char* names[] = {"q", "k", "v"};
    for (int i = 0; i < 3; ++i) require_layout(in[i], names[i]);
    std::vector<Layout> layouts = {layout_of(in[0]), layout_of(in[1]), layout_of(in[2])};
    std::vector<Layout> out_layouts = {layout_like(outs[0].shape(), outs[0].dtype(), in[0]),
                                       row_major(outs[1].shape(), mx::float32)};
    auto h = handle_for(enc);
    std::vector<Layout> all(layouts);
    all.insert(all.end(), out_layouts.begin(), out_layouts.end());
    std::lock_guard<std::mutex> lock(graphs_mutex);
    auto& b = cached(key_of("fwd", enc.device().cuda_device(), causal_, all), [&](Built& built) {
      built.graph = new_graph(in[0].dtype());
      auto& g = *built.graph;
      auto q = tensor(g, "q", Q, layouts[0]), k = tensor(g, "k", K, layouts[1]), v = tensor(g, "v", V, layouts[2]);
      auto opts = fe::graph::SDPA_attributes().set_name("mlxflow_sdpa")
                      .set_generate_stats(true).set_attn_scale(scale_tensor(g));
      if (causal_) opts.set_causal_mask(true);
      auto [o, st] = g.sdpa(q, k, v, opts);
      describe(*o, O, out_layouts[0]).set_output(true);
      describe(*st, STATS, out_layouts[1]).set_output(true);
      finish(g, h, built);
    });
    static constexpr int64_t uids[] = {O, STATS};
    execute(enc, h, b, in, outs, out_layouts, uids,
            {{Q, mx::gpu_ptr<void>(in[0])}, {K, mx::gpu_ptr<void>(in[1])}, {V, mx::gpu_ptr<void>(in[2])}});
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>& outputs) override {
    auto s = stream();
    // The stats output is internal (never returned to Python): its cotangent is zero.
    auto d_o = bthd(mx::astype(cotangents[0], primals[0].dtype(), s), s);
    auto grads = mx::array::make_arrays(
        {primals[0].shape(), primals[1].shape(), primals[2].shape()},
        {primals[0].dtype(), primals[1].dtype(), primals[2].dtype()},
        std::make_shared<AttentionVJP>(s, scale_, causal_),
        {primals[0], primals[1], primals[2], outputs[0], outputs[1], d_o});
    std::vector<mx::array> res;
    for (int a : argnums) res.push_back(grads[a]);
    return res;
  }
  const char* name() const override {
    return "MlxflowCudnnAttention";
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    auto& q = in[0];
    return {q.shape(), {q.shape(0), q.shape(1), q.shape(2), 1}};
  }
};

mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                    bool causal) {
  auto s = mx::to_stream(mx::StreamOrDevice{});
  if (s.device != mx::Device::gpu) fail("needs a GPU stream");
  for (const auto* a : {&q, &k, &v})
    if (a->ndim() != 4 || a->dtype() != q.dtype()) fail("q, k, v must be 4-D of one dtype");
  if (q.dtype() != mx::bfloat16 && q.dtype() != mx::float16) fail("only bfloat16 and float16 are supported");
  if (k.shape() != v.shape() || q.shape(0) != k.shape(0) || q.shape(3) != k.shape(3) ||
      k.shape(1) == 0 || q.shape(1) % k.shape(1) != 0 || q.shape(3) % 8 != 0 || q.shape(3) > 128)
    fail("need q [B, H, T, D], k = v [B, Hkv, S, D], H % Hkv == 0, D % 8 == 0, D <= 128");
  if (causal && q.shape(2) != k.shape(2))
    fail("a causal mask needs as many keys as queries (its alignment is top-left)");
  std::vector<mx::array> in = {bthd(q, s), bthd(k, s), bthd(v, s)};
  auto outs = mx::array::make_arrays(
      {q.shape(), {q.shape(0), q.shape(1), q.shape(2), 1}}, {q.dtype(), mx::float32},
      std::make_shared<Attention>(s, scale, causal), in);
  return outs[0];
}

}  // namespace

NB_MODULE(_mlxflow_cuda, m) {
  if (tracing()) install_crash_report();
  m.doc() = "mlxflow's cuDNN attention for MLX-CUDA (built lazily by mlxcore.kernels._build)";
  m.def("attention", &attention, "q"_a, "k"_a, "v"_a, "scale"_a, "causal"_a = true,
        "softmax(scale * q k^T [+ top-left causal mask]) v through cuDNN: q [B, H, T, D], k = v "
        "[B, Hkv, S, D] bfloat16 / float16, differentiable.");
  m.def("cudnn_version", [] { return static_cast<int64_t>(cudnnGetVersion()); });
  // Cheap call right after loading: raises TypeError if nanobind cannot see mlx.core.array.
  m.def("probe", [](const mx::array& a) { return a.size(); }, "a"_a);
}
