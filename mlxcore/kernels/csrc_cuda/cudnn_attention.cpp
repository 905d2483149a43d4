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
// through it. Each node's cuDNN execution is stream-captured into MLX-CUDA's command graph, as
// MLX does for its own cuDNN calls.
#include <cudnn.h>
#include <cudnn_frontend.h>
#include <nanobind/nanobind.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "mlx/array.h"
#include "mlx/backend/cuda/device.h"
#include "mlx/backend/cuda/utils.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace nb = nanobind;
namespace fe = cudnn_frontend;
namespace mx = mlx::core;
using namespace nb::literals;

namespace {

enum Uid : int64_t { Q = 1, K, V, SCALE, O, STATS, DQ, DK, DV, DO };

// MLXFLOW_CUDA_ATTENTION_TRACE=1: each step of building and running the graphs on stderr, flushed
// (the first GPU run crashed with no message: this says where the next one stops).
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
  fail("only bfloat16 and float16 are supported");
}

// Strides in elements, with a size-1 dimension given the stride its neighbour implies (MLX
// leaves those arbitrary; cuDNN reads them to infer the layout).
std::vector<int64_t> strides_of(const mx::array& a) {
  std::vector<int64_t> st(a.strides().begin(), a.strides().end());
  int n = static_cast<int>(a.ndim());
  for (int i = n - 1; i >= 0; --i)
    if (a.shape(i) == 1) st[i] = (i + 1 < n) ? st[i + 1] * a.shape(i + 1) : 1;
  return st;
}

std::vector<int64_t> dims_of(const mx::array& a) {
  return std::vector<int64_t>(a.shape().begin(), a.shape().end());
}

// cuDNN's flash kernels read 16-byte vectors along the head dimension.
void require_layout(const mx::array& a, const char* name) {
  auto addr = reinterpret_cast<uintptr_t>(mx::gpu_ptr<void>(a));
  if (a.strides(-1) != 1 || addr % 16 != 0) {
    std::ostringstream os;
    os << name << " must have a unit stride along the head dimension and 16-byte aligned data "
       << "(strides " << a.strides() << ", address % 16 = " << addr % 16 << ")";
    fail(os.str());
  }
}

// Allocate `out` with the memory layout of `like` (same order of strides), as MLX-CUDA does for
// its attention outputs: a q that is a transposed view of [B, T, H, D] gives an output that the
// caller's transpose + reshape back to [B, T, H * D] reads without a copy.
void alloc_like(mx::array& out, const mx::array& like) {
  auto data = mx::allocator::malloc(out.nbytes());
  if (like.flags().row_contiguous) {
    out.set_data(std::move(data));
    return;
  }
  std::vector<int> order(like.ndim());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    auto sa = like.strides(a) > 0 ? like.strides(a) : 1;
    auto sb = like.strides(b) > 0 ? like.strides(b) : 1;
    return sa < sb;
  });
  mx::Strides st(like.ndim());
  int64_t stride = 1;
  for (int i : order) {
    st[i] = stride;
    stride *= out.shape(i);
  }
  out.set_data(std::move(data), out.size(), st, {true, false, false});
}

cudnnHandle_t handle_for(mx::cu::CommandEncoder& enc) {
  static std::mutex mu;
  static std::unordered_map<int, cudnnHandle_t> handles;
  std::lock_guard<std::mutex> lock(mu);
  int dev = enc.device().cuda_device();
  auto it = handles.find(dev);
  if (it == handles.end()) {
    trace("cudnnCreate");
    enc.device().make_current();
    cudnnHandle_t h;
    if (cudnnCreate(&h) != CUDNN_STATUS_SUCCESS) fail("cudnnCreate failed");
    it = handles.emplace(dev, h).first;
  }
  cudnnSetStream(it->second, enc.stream());
  return it->second;
}

// Registers the node's arrays with the encoder (its graph dependencies), then the cuDNN handle.
cudnnHandle_t begin(mx::cu::CommandEncoder& enc, const std::vector<mx::array>& in,
                    const std::vector<mx::array>& outs) {
  for (const auto& a : in) enc.set_input_array(a);
  for (const auto& a : outs) enc.set_output_array(a);
  trace("arrays registered");
  return handle_for(enc);
}

struct Built {
  std::shared_ptr<fe::graph::Graph> graph;
  int64_t workspace = 0;
};

std::string key_of(const char* kind, int dev, bool causal, const std::vector<mx::array>& arrays) {
  std::ostringstream os;
  os << kind << '|' << dev << '|' << causal;
  for (const auto& a : arrays) {
    os << '|' << a.dtype() << ':';
    for (auto d : dims_of(a)) os << d << ',';
    os << ':';
    for (auto s : strides_of(a)) os << s << ',';
  }
  return os.str();
}

// Built graphs by kind, device, shapes and strides (bounded: a run sees a handful of shapes).
Built& cached(const std::string& key, const std::function<Built()>& build) {
  static std::mutex mu;
  static std::unordered_map<std::string, Built> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it == cache.end()) {
    if (cache.size() >= 256) cache.clear();
    it = cache.emplace(key, build()).first;
  }
  return it->second;
}

std::shared_ptr<fe::graph::Graph> new_graph(mx::Dtype dtype) {
  auto g = std::make_shared<fe::graph::Graph>();
  g->set_io_data_type(cudnn_type(dtype))
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  return g;
}

std::shared_ptr<fe::graph::Tensor_attributes> tensor(fe::graph::Graph& g, const char* name,
                                                     int64_t uid, const mx::array& a) {
  return g.tensor(fe::graph::Tensor_attributes()
                      .set_name(name)
                      .set_uid(uid)
                      .set_dim(dims_of(a))
                      .set_stride(strides_of(a))
                      .set_data_type(a.dtype() == mx::float32 ? fe::DataType_t::FLOAT
                                                              : cudnn_type(a.dtype())));
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
  check(g.build_operation_graph(h), "build_operation_graph");
  check(g.create_execution_plans({fe::HeurMode_t::A}), "create_execution_plans");
  check(g.check_support(h), "check_support");
  check(g.build_plans(h), "build_plans");
  check(g.get_workspace_size(b.workspace), "get_workspace_size");
}

// Runs the graph on the encoder's stream, captured into MLX-CUDA's command graph.
void run(mx::cu::CommandEncoder& enc, cudnnHandle_t h, Built& b,
         std::unordered_map<int64_t, void*>& pack) {
  void* ws = nullptr;
  if (b.workspace > 0) {
    mx::array buf({static_cast<int>((b.workspace + 3) / 4)}, mx::float32, nullptr, {});
    buf.set_data(mx::allocator::malloc(buf.nbytes()));
    enc.add_temporary(buf);
    ws = mx::gpu_ptr<void>(buf);
  }
  trace("capture: begin");
  auto capture = enc.capture_context();
  cudnnSetStream(h, enc.stream());
  trace("execute");
  auto err = b.graph->execute(h, pack, ws);
  if (err.is_bad()) {
    capture.discard = true;
    fail(std::string("execute: ") + err.get_message());
  }
  trace("capture: end");
}

// What both primitives share: the scale, the mask, CUDA only.
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
    for (int i = 0; i < 3; ++i) alloc_like(outs[i], in[i]);
    trace("backward: outputs allocated");
    auto h = begin(enc, in, outs);
    std::vector<mx::array> layout(in);
    layout.insert(layout.end(), outs.begin(), outs.end());
    auto& b = cached(key_of("bwd", enc.device().cuda_device(), causal_, layout), [&] {
      Built b{new_graph(in[0].dtype())};
      auto& g = *b.graph;
      auto q = tensor(g, "q", Q, in[0]), k = tensor(g, "k", K, in[1]), v = tensor(g, "v", V, in[2]);
      auto o = tensor(g, "o", O, in[3]), st = tensor(g, "stats", STATS, in[4]);
      auto d_o = tensor(g, "dO", DO, in[5]);
      auto opts = fe::graph::SDPA_backward_attributes().set_name("mlxflow_sdpa_backward")
                      .set_attn_scale(scale_tensor(g));
      if (causal_) opts.set_causal_mask(true);
      auto [dq, dk, dv] = g.sdpa_backward(q, k, v, o, d_o, st, opts);
      dq->set_output(true).set_uid(DQ).set_dim(dims_of(outs[0])).set_stride(strides_of(outs[0]));
      dk->set_output(true).set_uid(DK).set_dim(dims_of(outs[1])).set_stride(strides_of(outs[1]));
      dv->set_output(true).set_uid(DV).set_dim(dims_of(outs[2])).set_stride(strides_of(outs[2]));
      finish(g, h, b);
      return b;
    });
    float scale = scale_;
    std::unordered_map<int64_t, void*> pack{
        {Q, mx::gpu_ptr<void>(in[0])},  {K, mx::gpu_ptr<void>(in[1])},
        {V, mx::gpu_ptr<void>(in[2])},  {O, mx::gpu_ptr<void>(in[3])},
        {STATS, mx::gpu_ptr<void>(in[4])}, {DO, mx::gpu_ptr<void>(in[5])},
        {DQ, mx::gpu_ptr<void>(outs[0])}, {DK, mx::gpu_ptr<void>(outs[1])},
        {DV, mx::gpu_ptr<void>(outs[2])}, {SCALE, &scale}};
    run(enc, h, b, pack);
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
    alloc_like(outs[0], in[0]);
    outs[1].set_data(mx::allocator::malloc(outs[1].nbytes()));
    trace("forward: outputs allocated");
    auto h = begin(enc, in, outs);
    std::vector<mx::array> layout(in);
    layout.push_back(outs[0]);
    auto& b = cached(key_of("fwd", enc.device().cuda_device(), causal_, layout), [&] {
      Built b{new_graph(in[0].dtype())};
      auto& g = *b.graph;
      auto q = tensor(g, "q", Q, in[0]), k = tensor(g, "k", K, in[1]), v = tensor(g, "v", V, in[2]);
      auto opts = fe::graph::SDPA_attributes().set_name("mlxflow_sdpa")
                      .set_generate_stats(true).set_attn_scale(scale_tensor(g));
      if (causal_) opts.set_causal_mask(true);
      auto [o, st] = g.sdpa(q, k, v, opts);
      o->set_output(true).set_uid(O).set_dim(dims_of(outs[0])).set_stride(strides_of(outs[0]));
      st->set_output(true).set_uid(STATS).set_data_type(fe::DataType_t::FLOAT)
          .set_dim(dims_of(outs[1])).set_stride(strides_of(outs[1]));
      finish(g, h, b);
      return b;
    });
    float scale = scale_;
    std::unordered_map<int64_t, void*> pack{
        {Q, mx::gpu_ptr<void>(in[0])}, {K, mx::gpu_ptr<void>(in[1])},
        {V, mx::gpu_ptr<void>(in[2])}, {O, mx::gpu_ptr<void>(outs[0])},
        {STATS, mx::gpu_ptr<void>(outs[1])}, {SCALE, &scale}};
    run(enc, h, b, pack);
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
  cudnn_type(q.dtype());
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
  m.doc() = "mlxflow's cuDNN attention for MLX-CUDA (built lazily by mlxcore.kernels._build)";
  m.def("attention", &attention, "q"_a, "k"_a, "v"_a, "scale"_a, "causal"_a = true,
        "softmax(scale * q k^T [+ top-left causal mask]) v through cuDNN: q [B, H, T, D], k = v "
        "[B, Hkv, S, D] bfloat16 / float16, differentiable.");
  m.def("cudnn_version", [] { return static_cast<int64_t>(cudnnGetVersion()); });
  // Cheap call right after loading: raises TypeError if nanobind cannot see mlx.core.array.
  m.def("probe", [](const mx::array& a) { return a.size(); }, "a"_a);
}
