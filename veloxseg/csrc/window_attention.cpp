// Window attention for CPUs, one (window, head) at a time with every intermediate in L1/L2 cache:
// out = softmax(scale * q k^T + bias) v, q and k (N, h, T, c), v (N, h, T, cv), bias (h, T, T).
//
// Why by hand: VeloxSeg's windows are short (54 tokens at level 1) or narrow (head widths 4-8), where
// PyTorch's CPU kernels spend their time on memory traffic and per-matrix overhead: the fused
// scaled_dot_product_attention blocks for long, wide heads, and the written-out version materialises
// every score matrix and runs a batched GEMM per window. Here a block of queries (one SIMD vector) goes
// through all keys twice, scores in a cache-resident buffer: the softmax and the product with v are
// elementwise vector operations, with no score matrix in memory and no horizontal reductions.
// Built by veloxseg/layers/cpu_kernels.py with torch.utils.cpp_extension; at::vec picks the SIMD width.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kMaxWidth = 64;

// One (window, head): q, k (T, width), v (T, value_width) with the given strides (token, channel);
// bias_t (T keys, T queries) contiguous; out (T, value_width) contiguous. Queries go BLOCK vectors at a
// time. WIDTH / VALUE_WIDTH > 0 fix the widths at compile time (queries and accumulators stay in
// registers), 0 reads them from the arguments. scores: room for BLOCK vectors per key.
template <int64_t WIDTH, int64_t VALUE_WIDTH, int64_t BLOCK>
void attend(const float* q, const float* k, const float* v, const float* bias_t, float* out, int64_t length,
            int64_t width_arg, int64_t value_width_arg, const int64_t* qs, const int64_t* ks, const int64_t* vs,
            float scale, float* scores) {
  const int64_t width = WIDTH > 0 ? WIDTH : width_arg;
  const int64_t value_width = VALUE_WIDTH > 0 ? VALUE_WIDTH : value_width_arg;
  constexpr int64_t vec = Vec::size();
  Vec query[kMaxWidth][BLOCK], acc[kMaxWidth][BLOCK], running_max[BLOCK], total[BLOCK];
  float block[kMaxWidth * vec];
  for (int64_t i0 = 0; i0 < length; i0 += BLOCK * vec) {
    int64_t count[BLOCK];  // valid queries per vector
    for (int64_t b = 0; b < BLOCK; ++b) count[b] = std::clamp<int64_t>(length - i0 - b * vec, 0, vec);
    for (int64_t c = 0; c < width; ++c) {  // BLOCK vectors of queries, channel by channel
      for (int64_t b = 0; b < BLOCK; ++b) {
        float lanes[vec] = {};
        for (int64_t l = 0; l < count[b]; ++l) lanes[l] = q[(i0 + b * vec + l) * qs[0] + c * qs[1]] * scale;
        query[c][b] = Vec::loadu(lanes);
      }
    }
    for (int64_t b = 0; b < BLOCK; ++b) running_max[b] = Vec(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < length; ++j) {
      Vec s[BLOCK];
      for (int64_t b = 0; b < BLOCK; ++b) s[b] = Vec::loadu(bias_t + j * length + i0 + b * vec, count[b]);
      const float* kj = k + j * ks[0];
      for (int64_t c = 0; c < width; ++c) {
        const Vec key(kj[c * ks[1]]);
        for (int64_t b = 0; b < BLOCK; ++b) s[b] = at::vec::fmadd(key, query[c][b], s[b]);
      }
      for (int64_t b = 0; b < BLOCK; ++b) {
        s[b].store(scores + (j * BLOCK + b) * vec);
        running_max[b] = at::vec::maximum(running_max[b], s[b]);
      }
    }
    for (int64_t b = 0; b < BLOCK; ++b) {
      total[b] = Vec(0.f);
      for (int64_t c = 0; c < value_width; ++c) acc[c][b] = Vec(0.f);
    }
    for (int64_t j = 0; j < length; ++j) {
      Vec p[BLOCK];
      for (int64_t b = 0; b < BLOCK; ++b) {
        p[b] = (Vec::loadu(scores + (j * BLOCK + b) * vec) - running_max[b]).exp_u20();
        total[b] = total[b] + p[b];
      }
      const float* vj = v + j * vs[0];
      for (int64_t c = 0; c < value_width; ++c) {
        const Vec value(vj[c * vs[1]]);
        for (int64_t b = 0; b < BLOCK; ++b) acc[c][b] = at::vec::fmadd(p[b], value, acc[c][b]);
      }
    }
    for (int64_t b = 0; b < BLOCK; ++b) {
      const Vec norm = Vec(1.f) / total[b];
      for (int64_t c = 0; c < value_width; ++c) (acc[c][b] * norm).store(block + c * vec);
      for (int64_t l = 0; l < count[b]; ++l)
        for (int64_t c = 0; c < value_width; ++c) out[(i0 + b * vec + l) * value_width + c] = block[c * vec + l];
    }
  }
}

at::Tensor window_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                            double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "window_attention: q, k, v must be (N, h, T, c)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
                  bias.scalar_type() == at::kFloat,
              "window_attention: float32 tensors only");
  TORCH_CHECK(q.sizes() == k.sizes(), "window_attention: q and k shapes differ");
  const int64_t windows = q.size(0), heads = q.size(1), length = q.size(2), width = q.size(3);
  const int64_t value_width = v.size(3);
  TORCH_CHECK(v.size(0) == windows && v.size(1) == heads && v.size(2) == length, "window_attention: v shape");
  TORCH_CHECK(bias.sizes() == at::IntArrayRef({heads, length, length}), "window_attention: bias must be (h, T, T)");
  TORCH_CHECK(width <= kMaxWidth && value_width <= kMaxWidth, "window_attention: head widths above ", kMaxWidth);

  // Keys-major bias: free when the caller passes the transpose of a contiguous (h, T keys, T queries) tensor.
  const at::Tensor bias_t = bias.transpose(1, 2).contiguous();
  at::Tensor out = at::empty({windows, heads, length, value_width}, q.options());
  // VeloxSeg's head widths (q/k, v): levels 1-4 of veloxseg_small and veloxseg_base.
  auto run = &attend<0, 0, 1>;
  if (width == 4 && value_width == 4) run = &attend<4, 4, 2>;
  if (width == 8 && value_width == 8) run = &attend<8, 8, 1>;
  if (width == 8 && value_width == 16) run = &attend<8, 16, 1>;
  if (width == 16 && value_width == 32) run = &attend<16, 32, 1>;
  const int64_t qs[2] = {q.stride(2), q.stride(3)}, ks[2] = {k.stride(2), k.stride(3)};
  const int64_t vs[2] = {v.stride(2), v.stride(3)};
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* bp = bias_t.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, windows * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(length * 2 * Vec::size());  // up to two vectors of queries against every key
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t n = pair / heads, h = pair % heads;
      run(qp + n * q.stride(0) + h * q.stride(1), kp + n * k.stride(0) + h * k.stride(1),
          vp + n * v.stride(0) + h * v.stride(1), bp + h * length * length, op + pair * length * value_width, length,
          width, value_width, qs, ks, vs, static_cast<float>(scale), scores.data());
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(veloxseg, m) {
  m.def("window_attention(Tensor q, Tensor k, Tensor v, Tensor bias, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(veloxseg, CPU, m) { m.impl("window_attention", &window_attention); }
