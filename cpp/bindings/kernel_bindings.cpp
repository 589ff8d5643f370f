// Python bindings of the fused kernels (megalith.kernels._C.kernels). Tensors arrive as plain descriptors
// (pointer, dtype code, shape, strides, device index) built by megalith.kernels.ops; this file is the one
// place that checks them and turns a bad argument into an error naming it, then fills the param structs.
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common.h"
#include "megalith/kernels.h"

namespace megalith::bindings {

namespace {

namespace k = megalith::kernels;

// Dtype codes shared with python/megalith/kernels/ops.py (_DTYPE_CODES).
enum Code : int { kF32 = 0, kF16 = 1, kBF16 = 2, kI64 = 3, kBool = 4, kI32 = 5 };
const char* code_name(int code) {
  static const char* names[] = {"float32", "float16", "bfloat16", "int64", "bool", "int32"};
  return code >= 0 && code <= 5 ? names[code] : "an unsupported dtype";
}

// How an argument may be laid out in memory. On CUDA every argument must be dense.
enum class Layout {
  kDense,       // row-major, no gaps
  kRows,        // rows (all leading dimensions, collapsible into one) evenly spaced, the last dimension dense
  kInnerDense,  // any positive strides, the last dimension dense
};

struct Tensor {
  std::string name;
  uintptr_t ptr = 0;
  int code = -1;
  std::vector<int64_t> shape, strides;
  int device = -1;  // -1 = CPU, otherwise the CUDA device index
  bool present = false;
  int64_t row_stride = 0;  // elements between consecutive rows (kDense, kRows)

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
  int64_t size(int dim) const { return shape[dim < 0 ? shape.size() + dim : dim]; }
  int64_t rows() const { return shape.empty() ? 1 : numel() / shape.back(); }
  std::string shape_str() const {
    std::string out = "[";
    for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
    return out + "]";
  }
  void* data() const { return reinterpret_cast<void*>(ptr); }
};

void check_dense(const Tensor& t) {
  int64_t expected = 1;
  for (int i = static_cast<int>(t.shape.size()) - 1; i >= 0; --i) {
    if (t.shape[i] != 1 && t.strides[i] != expected) {
      fail(t.name, " must be contiguous (row-major), got shape ", t.shape_str(), " with stride ", t.strides[i],
           " in dimension ", i, " where ", expected, " was expected");
    }
    expected *= t.shape[i];
  }
}

// Sets t.row_stride for Layout::kRows: the leading dimensions must merge into one evenly spaced run of rows.
void check_rows(Tensor& t) {
  const int last = static_cast<int>(t.shape.size()) - 1;
  if (last >= 0 && t.shape[last] != 1 && t.strides[last] != 1) {
    fail(t.name, " must have a dense last dimension, got stride ", t.strides[last], " for shape ", t.shape_str());
  }
  t.row_stride = last >= 0 ? t.shape[last] : 1;
  int64_t expected = -1;  // the stride the next outer (non-size-1) dimension must have
  for (int i = last - 1; i >= 0; --i) {
    if (t.shape[i] == 1) continue;
    if (expected < 0) {
      if (t.strides[i] < 1) fail(t.name, " must have a positive row stride, got ", t.strides[i]);
      t.row_stride = t.strides[i];
    } else if (t.strides[i] != expected) {
      fail(t.name, " must have rows evenly spaced in memory (its leading dimensions merge into one), got shape ",
           t.shape_str(), " with stride ", t.strides[i], " in dimension ", i, " where ", expected, " was expected");
    }
    expected = t.strides[i] * t.shape[i];
  }
}

void check_inner_dense(Tensor& t) {
  for (size_t i = 0; i < t.shape.size(); ++i) {
    if (t.shape[i] == 1) {
      t.strides[i] = 1;  // never read with an index other than 0
    } else if (i + 1 == t.shape.size() ? t.strides[i] != 1 : t.strides[i] < 1) {
      fail(t.name, " must have positive strides and a dense last dimension, got shape ", t.shape_str(),
           " with stride ", t.strides[i], " in dimension ", i);
    }
  }
}

// Parses (ptr, dtype_code, shape, strides, device) or None; `name` is the user-facing argument name.
Tensor parse(const py::object& obj, const char* name, bool optional = false, Layout layout = Layout::kDense) {
  Tensor t;
  t.name = name;
  if (obj.is_none()) {
    if (!optional) fail(name, " is required, got None");
    return t;
  }
  auto tup = obj.cast<py::tuple>();
  if (tup.size() != 5) fail(name, ": expected a (ptr, dtype, shape, strides, device) descriptor");
  t.ptr = tup[0].cast<uintptr_t>();
  t.code = tup[1].cast<int>();
  t.shape = tup[2].cast<std::vector<int64_t>>();
  t.strides = tup[3].cast<std::vector<int64_t>>();
  t.device = tup[4].cast<int>();
  t.present = true;
  if (t.shape.size() != t.strides.size()) fail(name, ": shape and strides differ in length");
  // Strides of size-1 dimensions do not matter; strided layouts are a CPU feature.
  if (layout == Layout::kDense || t.device >= 0) {
    check_dense(t);
    t.row_stride = t.shape.empty() ? 1 : t.shape.back();
  } else if (layout == Layout::kRows) {
    check_rows(t);
  } else {
    check_inner_dense(t);
  }
  if (t.numel() > 0 && t.ptr == 0) fail(name, " has a null data pointer");
  return t;
}

void check_dim(const Tensor& t, size_t ndim) {
  if (t.shape.size() != ndim) fail(t.name, " must have ", ndim, " dimensions, got shape ", t.shape_str());
}

void check_float(const Tensor& t) {
  if (t.code != kF32 && t.code != kF16 && t.code != kBF16) {
    fail(t.name, " must be float32, float16 or bfloat16, got ", code_name(t.code));
  }
}

void check_code(const Tensor& t, int code) {
  if (t.code != code) fail(t.name, " must have dtype ", code_name(code), ", got ", code_name(t.code));
}

std::string device_str(int device) { return device < 0 ? "cpu" : "cuda:" + std::to_string(device); }

// Same device as `ref` (any dtype).
void check_device(const Tensor& a, const Tensor& ref) {
  if (a.present && a.device != ref.device) {
    fail(a.name, " must be on the device of ", ref.name, " (", device_str(ref.device), "), got ", device_str(a.device));
  }
}

// Same dtype and device as `ref`.
void check_same(const Tensor& a, const Tensor& ref) {
  if (!a.present) return;
  if (a.code != ref.code) {
    fail(a.name, " must have the same dtype as ", ref.name, " (", code_name(ref.code), "), got ", code_name(a.code));
  }
  check_device(a, ref);
}

void check_shape(const Tensor& t, const std::vector<int64_t>& shape) {
  Tensor expect = t;
  expect.shape = shape;
  if (t.shape != shape) fail(t.name, " must have shape ", expect.shape_str(), ", got ", t.shape_str());
}

k::DType dtype_of(const Tensor& t) { return static_cast<k::DType>(t.code); }

// The CUDA variant of a kernel as a callable; without CUDA compiled in, run() fails before calling it.
#ifdef MEGALITH_WITH_CUDA
#define CUDA_CALL(fn) [&](void* stream_handle) { k::cuda::fn(p, stream_handle); }
#else
#define CUDA_CALL(fn) [](void*) {}
#endif

// Runs the CPU or CUDA variant of a kernel for the device of `ref`, without holding the GIL.
template <typename CpuFn, typename CudaFn>
void run(const Tensor& ref, uintptr_t stream, CpuFn cpu, CudaFn cuda_fn) {
  if (ref.device < 0) {
    py::gil_scoped_release release;
    cpu();
    return;
  }
#ifdef MEGALITH_WITH_CUDA
  py::gil_scoped_release release;
  k::cuda::set_device(ref.device);
  cuda_fn(reinterpret_cast<void*>(stream));
#else
  (void)stream;
  (void)cuda_fn;
  fail(ref.name, " is a CUDA tensor but megalith-kernels was built without CUDA");
#endif
}

void norm_forward(py::object x_, py::object w_, py::object b_, py::object out_, py::object mean_, py::object rstd_,
                  double eps, bool rms, bool zero_centered, uintptr_t stream) {
  Tensor x = parse(x_, "x", false, Layout::kRows), w = parse(w_, "weight"), b = parse(b_, "bias", true);
  Tensor out = parse(out_, "out"), mean = parse(mean_, "mean", true), rstd = parse(rstd_, "rstd");
  check_float(x);
  if (x.shape.empty()) fail("x must have at least 1 dimension");
  check_same(w, x), check_same(b, x), check_same(out, x);
  check_shape(w, {x.size(-1)});
  if (b.present) check_shape(b, {x.size(-1)});
  check_shape(out, x.shape);
  check_code(rstd, kF32), check_device(rstd, x);
  if (rstd.numel() != x.rows()) fail("rstd must have ", x.rows(), " elements, got ", rstd.numel());
  if (!rms) {
    if (!mean.present) fail("mean is required for layer_norm");
    check_code(mean, kF32), check_device(mean, x);
    if (mean.numel() != x.rows()) fail("mean must have ", x.rows(), " elements, got ", mean.numel());
  }
  if (!(eps > 0)) fail("eps must be positive, got ", eps);
  k::NormParams p;
  p.x = x.data(), p.weight = w.data(), p.bias = b.present ? b.data() : nullptr, p.out = out.data();
  p.mean = rms ? nullptr : static_cast<float*>(mean.data()), p.rstd = static_cast<float*>(rstd.data());
  p.rows = x.rows(), p.cols = x.size(-1), p.x_stride = x.row_stride, p.eps = static_cast<float>(eps), p.rms = rms;
  p.zero_centered = zero_centered, p.dtype = dtype_of(x);
  run(x, stream, [&] { k::cpu::norm_forward(p); }, CUDA_CALL(norm_forward));
}

void norm_backward(py::object dy_, py::object x_, py::object w_, py::object mean_, py::object rstd_, py::object dx_,
                   py::object dw_, py::object db_, bool rms, bool zero_centered, uintptr_t stream) {
  Tensor dy = parse(dy_, "grad_out", false, Layout::kRows), x = parse(x_, "x", false, Layout::kRows);
  Tensor w = parse(w_, "weight"), mean = parse(mean_, "mean", true);
  Tensor rstd = parse(rstd_, "rstd"), dx = parse(dx_, "grad_x"), dw = parse(dw_, "grad_weight");
  Tensor db = parse(db_, "grad_bias", true);
  check_float(x);
  if (x.shape.empty()) fail("x must have at least 1 dimension");
  check_same(dy, x), check_same(w, x), check_same(dx, x);
  check_shape(dy, x.shape), check_shape(dx, x.shape), check_shape(w, {x.size(-1)});
  check_code(rstd, kF32), check_code(dw, kF32), check_shape(dw, {x.size(-1)});
  check_device(rstd, x), check_device(dw, x);
  if (rstd.numel() != x.rows()) fail("rstd must have ", x.rows(), " elements, got ", rstd.numel());
  if (!rms) {
    if (!mean.present) fail("mean is required for layer_norm backward");
    check_code(mean, kF32), check_device(mean, x);
    if (mean.numel() != x.rows()) fail("mean must have ", x.rows(), " elements, got ", mean.numel());
  }
  if (db.present) check_code(db, kF32), check_shape(db, {x.size(-1)}), check_device(db, x);
  k::NormBackwardParams p;
  p.dy = dy.data(), p.x = x.data(), p.weight = w.data();
  p.mean = rms ? nullptr : static_cast<const float*>(mean.data()), p.rstd = static_cast<const float*>(rstd.data());
  p.dx = dx.data(), p.dweight = static_cast<float*>(dw.data());
  p.dbias = db.present ? static_cast<float*>(db.data()) : nullptr;
  p.rows = x.rows(), p.cols = x.size(-1), p.rms = rms, p.zero_centered = zero_centered, p.dtype = dtype_of(x);
  p.x_stride = x.row_stride, p.dy_stride = dy.row_stride;
  run(x, stream, [&] { k::cpu::norm_backward(p); }, CUDA_CALL(norm_backward));
}

k::SoftmaxParams softmax_params(const Tensor& x, double scale, bool causal) {
  check_float(x), check_dim(x, 4);
  k::SoftmaxParams p;
  p.batch = x.size(0), p.heads = x.size(1), p.sq = x.size(2), p.sk = x.size(3);
  p.scale = static_cast<float>(scale), p.causal = causal, p.dtype = dtype_of(x);
  return p;
}

void softmax_forward(py::object x_, py::object mask_, py::object out_, double scale, bool causal, uintptr_t stream) {
  Tensor x = parse(x_, "x"), out = parse(out_, "out");
  k::SoftmaxParams p = softmax_params(x, scale, causal);
  check_same(out, x), check_shape(out, x.shape);
  if (!mask_.is_none()) {
    // The mask may be a broadcast (stride-0) view, so it is parsed here without the contiguity check.
    auto tup = mask_.cast<py::tuple>();
    Tensor mask{"mask", tup[0].cast<uintptr_t>(), tup[1].cast<int>(), tup[2].cast<std::vector<int64_t>>(),
                tup[3].cast<std::vector<int64_t>>(), tup[4].cast<int>(), true};
    check_code(mask, kBool), check_device(mask, x);
    check_dim(mask, 4);
    if (mask.shape != x.shape) fail("mask must be broadcast to the shape of x ", x.shape_str(), ", got ", mask.shape_str());
    p.mask = static_cast<const uint8_t*>(mask.data());
    for (int i = 0; i < 4; ++i) p.mask_strides[i] = mask.strides[i];
  }
  p.x = x.data(), p.out = out.data();
  run(x, stream, [&] { k::cpu::softmax_forward(p); }, CUDA_CALL(softmax_forward));
}

void softmax_backward(py::object y_, py::object dy_, py::object dx_, double scale, uintptr_t stream) {
  Tensor y = parse(y_, "out"), dy = parse(dy_, "grad_out"), dx = parse(dx_, "grad_x");
  k::SoftmaxParams p = softmax_params(y, scale, false);
  check_same(dy, y), check_same(dx, y), check_shape(dy, y.shape), check_shape(dx, y.shape);
  p.x = y.data(), p.dy = dy.data(), p.out = dx.data();
  run(y, stream, [&] { k::cpu::softmax_backward(p); }, CUDA_CALL(softmax_backward));
}

void rope(py::object x_, py::object cos_, py::object sin_, py::object out_, bool interleaved, bool inverse,
          uintptr_t stream) {
  Tensor x = parse(x_, "x", false, Layout::kInnerDense), c = parse(cos_, "cos"), s = parse(sin_, "sin");
  Tensor out = parse(out_, "out");
  check_float(x), check_dim(x, 4), check_same(out, x), check_shape(out, x.shape);
  check_code(c, kF32), check_code(s, kF32), check_device(c, x), check_device(s, x), check_dim(c, 2);
  if (c.size(0) != x.size(1)) fail("cos must have one row per position (", x.size(1), "), got shape ", c.shape_str());
  const int64_t rot = 2 * c.size(1);
  if (rot > x.size(3) || rot == 0) {
    fail("cos/sin give a rotated width of ", rot, " (2 * cos.shape[1]) but it must be in [2, ", x.size(3), "]");
  }
  check_shape(s, c.shape);
  k::RopeParams p;
  p.x = x.data(), p.cos = static_cast<const float*>(c.data()), p.sin = static_cast<const float*>(s.data());
  p.out = out.data(), p.batch = x.size(0), p.seq = x.size(1), p.heads = x.size(2), p.dim = x.size(3);
  p.rot_dim = rot, p.interleaved = interleaved, p.inverse = inverse, p.dtype = dtype_of(x);
  for (int i = 0; i < 3; ++i) p.x_strides[i] = x.strides[i];
  run(x, stream, [&] { k::cpu::rope(p); }, CUDA_CALL(rope));
}

void swiglu(py::object gate_, py::object up_, py::object dout_, py::object out_, py::object dgate_, py::object dup_,
            uintptr_t stream) {
  Tensor g = parse(gate_, "gate", false, Layout::kRows), u = parse(up_, "up", false, Layout::kRows);
  check_float(g), check_same(u, g), check_shape(u, g.shape);
  k::SwigluParams p;
  p.gate = g.data(), p.up = u.data(), p.n = g.numel(), p.dtype = dtype_of(g);
  p.rows = g.rows(), p.cols = g.shape.empty() ? 1 : g.size(-1);
  p.gate_stride = g.row_stride, p.up_stride = u.row_stride;
  if (dout_.is_none()) {
    Tensor out = parse(out_, "out");
    check_same(out, g), check_shape(out, g.shape);
    p.out = out.data();
    run(g, stream, [&] { k::cpu::swiglu_forward(p); }, CUDA_CALL(swiglu_forward));
    return;
  }
  Tensor d = parse(dout_, "grad_out", false, Layout::kRows), dg = parse(dgate_, "grad_gate");
  Tensor du = parse(dup_, "grad_up");
  for (const Tensor* t : {&d, &dg, &du}) check_same(*t, g), check_shape(*t, g.shape);
  p.dout = d.data(), p.dgate = dg.data(), p.dup = du.data(), p.dout_stride = d.row_stride;
  run(g, stream, [&] { k::cpu::swiglu_backward(p); }, CUDA_CALL(swiglu_backward));
}

void bias_gelu(py::object x_, py::object bias_, py::object dout_, py::object out_, bool tanh_approx,
               uintptr_t stream) {
  Tensor x = parse(x_, "x", false, Layout::kRows), b = parse(bias_, "bias", true);
  Tensor d = parse(dout_, "grad_out", true, Layout::kRows);
  Tensor out = parse(out_, d.present ? "grad_x" : "out");
  check_float(x);
  if (x.shape.empty()) fail("x must have at least 1 dimension");
  check_same(b, x), check_same(d, x), check_same(out, x), check_shape(out, x.shape);
  if (b.present) check_shape(b, {x.size(-1)});
  if (d.present) check_shape(d, x.shape);
  k::GeluParams p;
  p.x = x.data(), p.bias = b.present ? b.data() : nullptr, p.dout = d.present ? d.data() : nullptr;
  p.out = out.data(), p.rows = x.rows(), p.cols = x.size(-1), p.tanh_approx = tanh_approx, p.dtype = dtype_of(x);
  p.x_stride = x.row_stride, p.dout_stride = d.present ? d.row_stride : 0;
  if (d.present) {
    run(x, stream, [&] { k::cpu::bias_gelu_backward(p); }, CUDA_CALL(bias_gelu_backward));
  } else {
    run(x, stream, [&] { k::cpu::bias_gelu_forward(p); }, CUDA_CALL(bias_gelu_forward));
  }
}

// Shared checks of the cross-entropy entry points: logits [rows, cols], target int64 [rows].
k::CrossEntropyParams ce_params(const Tensor& logits, const Tensor& target, int64_t vocab_start, int64_t vocab_total,
                                int64_t ignore_index, double label_smoothing) {
  check_float(logits), check_dim(logits, 2), check_code(target, kI64), check_device(target, logits);
  check_shape(target, {logits.size(0)});
  if (logits.size(1) < 1) fail("logits must have at least one vocabulary column, got shape ", logits.shape_str());
  if (vocab_start < 0 || vocab_start + logits.size(1) > vocab_total) {
    fail("vocab_start (", vocab_start, ") + local vocabulary (", logits.size(1), ") exceeds vocab_total (",
         vocab_total, ")");
  }
  if (!(label_smoothing >= 0.0 && label_smoothing <= 1.0)) {
    fail("label_smoothing must be in [0, 1], got ", label_smoothing);
  }
  k::CrossEntropyParams p;
  p.logits = logits.data(), p.target = static_cast<const int64_t*>(target.data());
  p.rows = logits.size(0), p.cols = logits.size(1), p.vocab_start = vocab_start, p.vocab_total = vocab_total;
  p.logits_stride = logits.row_stride;
  p.ignore_index = ignore_index, p.label_smoothing = static_cast<float>(label_smoothing), p.dtype = dtype_of(logits);
  return p;
}

float* f32_rows(const py::object& obj, const char* name, const Tensor& logits) {
  Tensor t = parse(obj, name);
  check_code(t, kF32), check_device(t, logits), check_shape(t, {logits.size(0)});
  return static_cast<float*>(t.data());
}

void cross_entropy_forward(py::object logits_, py::object target_, py::object loss_, py::object lse_,
                           int64_t ignore_index, double label_smoothing, uintptr_t stream) {
  Tensor logits = parse(logits_, "logits", false, Layout::kRows), target = parse(target_, "target");
  k::CrossEntropyParams p = ce_params(logits, target, 0, logits.size(-1), ignore_index, label_smoothing);
  p.loss = f32_rows(loss_, "loss", logits), p.lse = f32_rows(lse_, "lse", logits);
  run(logits, stream, [&] { k::cpu::cross_entropy_forward(p); }, CUDA_CALL(cross_entropy_forward));
}

void cross_entropy_partials(py::object logits_, py::object target_, py::object max_, py::object sumexp_,
                            py::object target_logit_, py::object sum_logits_, int64_t vocab_start, uintptr_t stream) {
  Tensor logits = parse(logits_, "logits", false, Layout::kRows), target = parse(target_, "target");
  k::CrossEntropyParams p = ce_params(logits, target, vocab_start, vocab_start + logits.size(-1), -100, 0.0);
  p.local_max = f32_rows(max_, "local_max", logits), p.local_sumexp = f32_rows(sumexp_, "local_sumexp", logits);
  p.target_logit = f32_rows(target_logit_, "target_logit", logits);
  p.sum_logits = f32_rows(sum_logits_, "sum_logits", logits);
  run(logits, stream, [&] { k::cpu::cross_entropy_partials(p); },
      CUDA_CALL(cross_entropy_partials));
}

void cross_entropy_backward(py::object logits_, py::object target_, py::object lse_, py::object dloss_,
                            py::object dlogits_, int64_t vocab_start, int64_t vocab_total, int64_t ignore_index,
                            double label_smoothing, uintptr_t stream) {
  Tensor logits = parse(logits_, "logits", false, Layout::kRows), target = parse(target_, "target");
  Tensor dl = parse(dlogits_, "grad_logits");
  k::CrossEntropyParams p = ce_params(logits, target, vocab_start, vocab_total, ignore_index, label_smoothing);
  check_same(dl, logits), check_shape(dl, logits.shape);
  p.lse_in = f32_rows(lse_, "lse", logits), p.dloss = f32_rows(dloss_, "grad_loss", logits), p.dlogits = dl.data();
  run(logits, stream, [&] { k::cpu::cross_entropy_backward(p); },
      CUDA_CALL(cross_entropy_backward));
}

// Checks the contents of a CPU cu_seqlens tensor: 0 first, non-decreasing, `total` last, no sequence longer
// than max_len. (CUDA ones are not read here; the kernels clamp them to the tensors instead.)
void check_cu_seqlens(const Tensor& cu, int64_t total, int64_t max_len, const char* max_name) {
  const auto* c = static_cast<const int32_t*>(cu.data());
  const int64_t n = cu.numel();
  if (c[0] != 0) fail(cu.name, "[0] must be 0, got ", c[0]);
  for (int64_t i = 0; i + 1 < n; ++i) {
    const int64_t len = static_cast<int64_t>(c[i + 1]) - c[i];
    if (len < 0) fail(cu.name, " must be non-decreasing, got ", c[i], " then ", c[i + 1], " at index ", i + 1);
    if (len > max_len) fail("sequence ", i, " has ", len, " tokens (", cu.name, ") but ", max_name, " is ", max_len);
  }
  if (c[n - 1] != total) fail(cu.name, "[-1] must be the number of tokens (", total, "), got ", c[n - 1]);
}

// Checks q, k, v (dense: [b, sq, hq, d] and [b, sk, hkv, d]; varlen: [tq, hq, d] and [tk, hkv, d] with
// int32 cu_seqlens [batch + 1]) and returns the geometry of the call.
k::AttentionShape attention_shape(const Tensor& q, const Tensor& kt, const Tensor& v, const Tensor& cu_q,
                                  const Tensor& cu_k, int64_t max_q, int64_t max_k, double scale, bool causal,
                                  int64_t q_offset, int64_t k_offset) {
  const bool varlen = cu_q.present;
  if (cu_k.present != varlen) fail("cu_seqlens_q and cu_seqlens_k must be given together");
  const size_t rank = varlen ? 3 : 4;
  check_float(q), check_dim(q, rank), check_dim(kt, rank), check_same(kt, q), check_same(v, q);
  check_shape(v, kt.shape);
  const int heads_dim = static_cast<int>(rank) - 2;
  if (kt.size(-1) != q.size(-1) || (!varlen && kt.size(0) != q.size(0))) {
    const std::string dim = std::to_string(q.size(-1));
    const std::string want = varlen ? "[tokens_k, heads_kv, " + dim + "]"
                                    : "[" + std::to_string(q.size(0)) + ", seq_k, heads_kv, " + dim + "]";
    fail("k must have shape ", want, " to match q ", q.shape_str(), ", got ", kt.shape_str());
  }
  if (kt.size(heads_dim) < 1 || q.size(heads_dim) % kt.size(heads_dim) != 0) {
    fail("the number of k/v heads (", kt.size(heads_dim), ") must divide the number of q heads (", q.size(heads_dim),
         ")");
  }
  if (q.size(-1) < 1) fail("head_dim must be positive, got q ", q.shape_str());
  if (!std::isfinite(scale)) fail("scale must be finite, got ", scale);
  k::AttentionShape s;
  s.heads_q = q.size(heads_dim), s.heads_kv = kt.size(heads_dim), s.dim = q.size(-1);
  s.scale = static_cast<float>(scale), s.causal = causal, s.causal_shift = q_offset - k_offset;
  s.dtype = dtype_of(q);
  if (!varlen) {
    s.batch = q.size(0), s.seq_q = q.size(1), s.seq_k = kt.size(1);
    s.total_q = s.batch * s.seq_q, s.total_k = s.batch * s.seq_k;
    return s;
  }
  for (const Tensor* cu : {&cu_q, &cu_k}) check_code(*cu, kI32), check_device(*cu, q), check_dim(*cu, 1);
  if (cu_q.numel() < 1 || cu_k.numel() != cu_q.numel()) {
    fail("cu_seqlens_q and cu_seqlens_k must both have batch + 1 >= 1 entries, got ", cu_q.numel(), " and ",
         cu_k.numel());
  }
  if (max_q < 0 || max_k < 0) fail("max_seqlen_q and max_seqlen_k must be >= 0, got ", max_q, " and ", max_k);
  s.batch = cu_q.numel() - 1, s.seq_q = max_q, s.seq_k = max_k, s.total_q = q.size(0), s.total_k = kt.size(0);
  s.cu_seqlens_q = static_cast<const int32_t*>(cu_q.data()), s.cu_seqlens_k = static_cast<const int32_t*>(cu_k.data());
  if (q.device < 0) {
    check_cu_seqlens(cu_q, s.total_q, max_q, "max_seqlen_q");
    check_cu_seqlens(cu_k, s.total_k, max_k, "max_seqlen_k");
  }
  return s;
}

// lse/delta: float32 [batch, heads_q, seq_q] (dense) or [heads_q, total_q] (varlen) on the device of q.
void check_lse(const Tensor& t, const Tensor& q, const k::AttentionShape& s) {
  check_code(t, kF32), check_device(t, q);
  check_shape(t, s.cu_seqlens_q != nullptr ? std::vector<int64_t>{s.heads_q, s.total_q}
                                           : std::vector<int64_t>{s.batch, s.heads_q, s.seq_q});
}

void attention_forward(py::object q_, py::object k_, py::object v_, py::object out_, py::object lse_,
                       py::object cu_q_, py::object cu_k_, int64_t max_q, int64_t max_k, double scale, bool causal,
                       int64_t q_offset, int64_t k_offset, uintptr_t stream) {
  Tensor q = parse(q_, "q"), kt = parse(k_, "k"), v = parse(v_, "v"), out = parse(out_, "out");
  Tensor lse = parse(lse_, "lse"), cu_q = parse(cu_q_, "cu_seqlens_q", true);
  Tensor cu_k = parse(cu_k_, "cu_seqlens_k", true);
  k::AttentionParams p;
  static_cast<k::AttentionShape&>(p) =
      attention_shape(q, kt, v, cu_q, cu_k, max_q, max_k, scale, causal, q_offset, k_offset);
  check_same(out, q), check_shape(out, q.shape), check_lse(lse, q, p);
  p.q = q.data(), p.k = kt.data(), p.v = v.data(), p.out = out.data(), p.lse = static_cast<float*>(lse.data());
  run(q, stream, [&] { k::cpu::attention_forward(p); }, CUDA_CALL(attention_forward));
}

void attention_backward(py::object q_, py::object k_, py::object v_, py::object out_, py::object dout_,
                        py::object lse_, py::object dlse_, py::object delta_, py::object cu_q_, py::object cu_k_,
                        int64_t max_q, int64_t max_k, py::object dq_, py::object dk_, py::object dv_, double scale,
                        bool causal, int64_t q_offset, int64_t k_offset, uintptr_t stream) {
  Tensor q = parse(q_, "q"), kt = parse(k_, "k"), v = parse(v_, "v"), out = parse(out_, "out");
  Tensor dout = parse(dout_, "grad_out"), lse = parse(lse_, "lse"), dlse = parse(dlse_, "grad_lse", true);
  Tensor delta = parse(delta_, "delta"), cu_q = parse(cu_q_, "cu_seqlens_q", true);
  Tensor cu_k = parse(cu_k_, "cu_seqlens_k", true);
  Tensor dq = parse(dq_, "grad_q"), dk = parse(dk_, "grad_k"), dv = parse(dv_, "grad_v");
  k::AttentionBackwardParams p;
  static_cast<k::AttentionShape&>(p) =
      attention_shape(q, kt, v, cu_q, cu_k, max_q, max_k, scale, causal, q_offset, k_offset);
  for (const Tensor* t : {&out, &dout, &dq}) check_same(*t, q), check_shape(*t, q.shape);
  for (const Tensor* t : {&dk, &dv}) check_same(*t, q), check_shape(*t, kt.shape);
  check_lse(lse, q, p), check_lse(delta, q, p);
  if (dlse.present) check_lse(dlse, q, p);
  p.q = q.data(), p.k = kt.data(), p.v = v.data(), p.out = out.data(), p.dout = dout.data();
  p.lse = static_cast<const float*>(lse.data()), p.delta = static_cast<float*>(delta.data());
  p.dlse = dlse.present ? static_cast<const float*>(dlse.data()) : nullptr;
  p.dq = dq.data(), p.dk = dk.data(), p.dv = dv.data();
  run(q, stream, [&] { k::cpu::attention_backward(p); }, CUDA_CALL(attention_backward));
}

}  // namespace

void bind_kernels(py::module_& m) {
  m.def("set_num_threads", &k::cpu::set_num_threads, py::arg("num_threads"));
  m.def("num_threads", &k::cpu::num_threads);
  m.def("use_openmp", &k::cpu::use_openmp, py::arg("enable"));
  m.def("thread_backend", &k::cpu::thread_backend);
  m.def("set_cpu_isa", [](const std::string& name) { k::cpu::set_isa(name.c_str()); }, py::arg("name"));
  m.def("cpu_isa", &k::cpu::isa_name);
  m.def("cpu_isa_available", [](const std::string& name) { return k::cpu::isa_available(name.c_str()); },
        py::arg("name"));
  m.def("norm_forward", &norm_forward);
  m.def("norm_backward", &norm_backward);
  m.def("softmax_forward", &softmax_forward);
  m.def("softmax_backward", &softmax_backward);
  m.def("rope", &rope);
  m.def("swiglu", &swiglu);
  m.def("bias_gelu", &bias_gelu);
  m.def("cross_entropy_forward", &cross_entropy_forward);
  m.def("cross_entropy_partials", &cross_entropy_partials);
  m.def("cross_entropy_backward", &cross_entropy_backward);
  m.def("attention_forward", &attention_forward);
  m.def("attention_backward", &attention_backward);
}

}  // namespace megalith::bindings
