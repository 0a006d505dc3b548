// The last step of the *_hr variants' detail path, for CPUs: a 1x1x1 conv into 2^3 logit corrections
// per class, each class's half-resolution logit added to its eight corrections, and a 2x pixel shuffle,
// in one pass that writes the full-resolution logits; its backward in one pass over their gradient.
//
// Why by hand: as PyTorch ops the step is a conv, a repeat of the coarse logits, an add and a strided
// shuffle copy, each a pass over (B, 8C, D, H, W) tensors, and as many passes back (about 11 ms of a
// veloxseg_small_hr training step at 2 x 64^3, one thread). Built by veloxseg/layers/cpu_kernels.py
// with torch.utils.cpp_extension.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace {

// Shapes shared by the forward and the backward: x (B, K, D, H, W), weight (8C, K), coarse (B, C, D, H, W).
struct Geometry {
  int64_t batch, in_ch, classes, depth, height, width;
  int64_t plane() const { return height * width; }
  int64_t volume() const { return depth * height * width; }
};

Geometry check_inputs(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(x.dim() == 5 && x.is_contiguous(), op, ": x must be a contiguous (B, K, D, H, W) tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1) && weight.size(0) % 8 == 0 && weight.is_contiguous(),
              op, ": weight must be a contiguous (8 C, K) matrix for x of K = ", x.size(1), " channels");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": x and weight must have one dtype");
  return {x.size(0), x.size(1), weight.size(0) / 8, x.size(2), x.size(3), x.size(4)};
}

// out (B, C, 2D, 2H, 2W) = shuffle_2(conv1x1(x; weight, bias) + repeat(coarse, 8 per class)), one SIMD
// chunk of an input row at a time: its K channels loaded once, each output pair (s3 = 0, 1) interleaved
// into two chunks of an output row.
template <typename scalar_t>
void forward_rows(const Geometry& g, const scalar_t* x, const scalar_t* w, const scalar_t* bias,
                  const scalar_t* coarse, scalar_t* out) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t lanes = Vec::size();
  const int64_t W = g.width, K = g.in_ch;
  at::parallel_for(0, g.batch * g.depth * g.height, 1, [&](int64_t begin, int64_t end) {
    std::vector<Vec> xs(K);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (g.depth * g.height), d = row / g.height % g.depth, h = row % g.height;
      const int64_t offset = (d * g.height + h) * W;
      for (int64_t j = 0; j < W; j += lanes) {
        const int64_t count = std::min(lanes, W - j);
        for (int64_t k = 0; k < K; ++k) xs[k] = Vec::loadu(x + (b * K + k) * g.volume() + offset + j, count);
        for (int64_t c = 0; c < g.classes; ++c) {
          const Vec base = Vec::loadu(coarse + (b * g.classes + c) * g.volume() + offset + j, count);
          for (int64_t pair = 0; pair < 4; ++pair) {  // (s1, s2); s3 is the parity within the output row
            const int64_t o = c * 8 + pair * 2;
            Vec even = base + Vec(bias[o]), odd = base + Vec(bias[o + 1]);
            for (int64_t k = 0; k < K; ++k) {
              even = at::vec::fmadd(Vec(w[o * K + k]), xs[k], even);
              odd = at::vec::fmadd(Vec(w[(o + 1) * K + k]), xs[k], odd);
            }
            const auto [low, high] = at::vec::interleave2(even, odd);
            scalar_t* dst = out + (((b * g.classes + c) * 2 * g.depth + 2 * d + pair / 2) * 2 * g.height + 2 * h +
                                   pair % 2) * 2 * W + 2 * j;  // fmt: skip
            low.store(dst, std::min(lanes, 2 * count));
            if (2 * count > lanes) high.store(dst + lanes, 2 * count - lanes);
          }
        }
      }
    }
  });
}

at::Tensor detail_logits(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         const at::Tensor& coarse) {
  const Geometry g = check_inputs(x, weight, "detail_logits");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0) && bias.is_contiguous() &&
                  bias.scalar_type() == x.scalar_type(),
              "detail_logits: bias must be a contiguous (8 C,) vector of x's dtype");
  TORCH_CHECK(coarse.sizes() == at::IntArrayRef({g.batch, g.classes, g.depth, g.height, g.width}) &&
                  coarse.is_contiguous() && coarse.scalar_type() == x.scalar_type(),
              "detail_logits: coarse must be a contiguous (B, C, D, H, W) tensor of x's dtype and size");
  at::Tensor out = at::empty({g.batch, g.classes, 2 * g.depth, 2 * g.height, 2 * g.width}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "detail_logits", [&] {
    forward_rows<scalar_t>(g, x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
                           coarse.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
  });
  return out;
}

// sum_j a[j] b[j] over n values, four SIMD chains.
template <typename scalar_t>
scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t lanes = Vec::size();
  Vec acc[4] = {Vec(0), Vec(0), Vec(0), Vec(0)};
  int64_t j = 0;
  for (; j + 4 * lanes <= n; j += 4 * lanes)
    for (int64_t u = 0; u < 4; ++u)
      acc[u] = at::vec::fmadd(Vec::loadu(a + j + u * lanes), Vec::loadu(b + j + u * lanes), acc[u]);
  for (; j < n; j += lanes) {
    const int64_t count = std::min(lanes, n - j);  // lanes past count load as zeros
    acc[0] = at::vec::fmadd(Vec::loadu(a + j, count), Vec::loadu(b + j, count), acc[0]);
  }
  return at::vec::vec_reduce_all<scalar_t>([](Vec& p, Vec& q) { return p + q; }, (acc[0] + acc[1]) + (acc[2] + acc[3]));
}

// out[j] (+)= scale * a[j] over n values; accumulate false: out = scale * a.
template <typename scalar_t>
void scaled_add(scalar_t* out, const scalar_t* a, scalar_t scale, int64_t n, bool accumulate) {
  using Vec = at::vec::Vectorized<scalar_t>;
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - j);
    const Vec base = accumulate ? Vec::loadu(out + j, count) : Vec(0);
    at::vec::fmadd(Vec(scale), Vec::loadu(a + j, count), base).store(out + j, count);
  }
}

constexpr int64_t kRows = 8;  // input rows per backward task: its unshuffled gradient stays in L1

// One task, rows [h0, h1) of plane d of sample b: the output gradient's rows there de-interleaved into
// unshuffled (8C, n) (n = (h1 - h0) W; output o = 8c + 4 s1 + 2 s2 + s3), summed per class into grad_coarse;
// then grad_x = weight^T unshuffled there and the task's weight and bias gradients into partial (8C, K + 1),
// the bias in the last column.
template <typename scalar_t>
void backward_rows(const Geometry& g, int64_t b, int64_t d, int64_t h0, int64_t h1, const scalar_t* grad,
                   const scalar_t* x, const scalar_t* w, scalar_t* unshuffled, scalar_t* grad_x, scalar_t* grad_coarse,
                   scalar_t* partial) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t lanes = Vec::size();
  const int64_t W = g.width, K = g.in_ch, outputs = 8 * g.classes, n = (h1 - h0) * W;
  const int64_t first = d * g.plane() + h0 * W;  // the task's first voxel in a channel
  for (int64_t c = 0; c < g.classes; ++c) {
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t j = 0; j < W; j += lanes) {
        const int64_t count = std::min(lanes, W - j);
        Vec sum(0);
        for (int64_t pair = 0; pair < 4; ++pair) {  // (s1, s2)
          const scalar_t* src = grad + (((b * g.classes + c) * 2 * g.depth + 2 * d + pair / 2) * 2 * g.height +
                                        2 * h + pair % 2) * 2 * W + 2 * j;  // fmt: skip
          const Vec low = Vec::loadu(src, std::min(lanes, 2 * count));
          const Vec high = 2 * count > lanes ? Vec::loadu(src + lanes, 2 * count - lanes) : Vec(0);
          const auto [even, odd] = at::vec::deinterleave2(low, high);
          scalar_t* dst = unshuffled + (c * 8 + pair * 2) * n + (h - h0) * W + j;
          even.store(dst, count);
          odd.store(dst + n, count);
          sum = sum + even + odd;
        }
        sum.store(grad_coarse + (b * g.classes + c) * g.volume() + d * g.plane() + h * W + j, count);
      }
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* xk = x + (b * K + k) * g.volume() + first;
    scalar_t* gxk = grad_x + (b * K + k) * g.volume() + first;
    for (int64_t o = 0; o < outputs; ++o) {
      scaled_add(gxk, unshuffled + o * n, w[o * K + k], n, o > 0);
      partial[o * (K + 1) + k] = dot(unshuffled + o * n, xk, n);
    }
  }
  const std::vector<scalar_t> ones(n, scalar_t(1));
  for (int64_t o = 0; o < outputs; ++o) partial[o * (K + 1) + K] = dot(unshuffled + o * n, ones.data(), n);
}

// Gradients of detail_logits in x, weight (8C, K), bias and coarse, given the gradient of its output.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> detail_logits_backward(const at::Tensor& grad,
                                                                                  const at::Tensor& x,
                                                                                  const at::Tensor& weight) {
  const Geometry g = check_inputs(x, weight, "detail_logits_backward");
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({g.batch, g.classes, 2 * g.depth, 2 * g.height, 2 * g.width}) &&
                  grad.is_contiguous() && grad.scalar_type() == x.scalar_type(),
              "detail_logits_backward: grad must be a contiguous (B, C, 2D, 2H, 2W) tensor of x's dtype");
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_coarse = at::empty({g.batch, g.classes, g.depth, g.height, g.width}, x.options());
  // One partial (8C, K + 1) per task, summed below: the same result for any thread count.
  const int64_t blocks = (g.height + kRows - 1) / kRows, tasks = g.batch * g.depth * blocks;
  at::Tensor partials = at::empty({tasks, weight.size(0), g.in_ch + 1}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "detail_logits_backward", [&] {
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> unshuffled(weight.size(0) * kRows * g.width);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t slab = task / blocks, h0 = task % blocks * kRows;
        backward_rows<scalar_t>(g, slab / g.depth, slab % g.depth, h0, std::min(g.height, h0 + kRows),
                                grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                unshuffled.data(), grad_x.data_ptr<scalar_t>(), grad_coarse.data_ptr<scalar_t>(),
                                partials.data_ptr<scalar_t>() + task * partials.stride(0));
      }
    });
  });
  at::Tensor summed = partials.sum(0);
  return {grad_x, summed.narrow(1, 0, g.in_ch).contiguous(), summed.select(1, g.in_ch).contiguous(), grad_coarse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(veloxseg, m) {
  m.def("detail_logits(Tensor x, Tensor weight, Tensor bias, Tensor coarse) -> Tensor");
  m.def("detail_logits_backward(Tensor grad, Tensor x, Tensor weight) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(veloxseg, CPU, m) {
  m.impl("detail_logits", &detail_logits);
  m.impl("detail_logits_backward", &detail_logits_backward);
}
