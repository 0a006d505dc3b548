// GELU(instance norm(x)) for channels-last tensors on CPUs, forward and backward: x (B, N, C), each
// (sample, channel)'s statistics over its N voxels. The detail path of the *_hr variants runs channels-last
// while training (its 3^3 conv kernel, csrc/conv3x3_channels_last.cpp, reads and writes that layout), and
// this keeps its norms from copying to channels-first and back; PyTorch's group norm on channels-last
// tensors took 5x the channels-first kernel's time (2 x 8 x 32^3, one thread). Values are read in runs of
// P = lcm(C, SIMD lanes) values: lane l of a run belongs to channel l % C, so a run is whole SIMD vectors
// whatever C is. Built by veloxseg/layers/cpu_kernels.py with torch.utils.cpp_extension; the channels-first
// kernel is csrc/norm_gelu.cpp.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

template <typename scalar_t>
using Vec = at::vec::Vectorized<scalar_t>;

// A sample's N x C values as runs of `period` values (a whole number of voxels and of SIMD vectors); the
// last run may be partial.
struct Runs {
  int64_t channels, period, vectors, values;
  Runs(int64_t n, int64_t c, int64_t lanes)
      : channels(c), period(std::lcm(c, lanes)), vectors(period / lanes), values(n * c) {}
};

// Per-channel sums of `sums` (one Vec per SIMD vector of a run): sums over lanes of the same channel.
template <typename scalar_t>
std::vector<double> per_channel(const std::vector<Vec<scalar_t>>& sums, const Runs& runs) {
  constexpr int64_t lanes = Vec<scalar_t>::size();
  std::vector<double> out(runs.channels, 0.0);
  scalar_t buffer[lanes];
  for (int64_t v = 0; v < runs.vectors; ++v) {
    sums[v].store(buffer);
    for (int64_t l = 0; l < lanes; ++l) out[(v * lanes + l) % runs.channels] += buffer[l];
  }
  return out;
}

// Each channel's value `per_ch[c]` laid out as one run: lane l holds channel l % C's value.
template <typename scalar_t>
std::vector<Vec<scalar_t>> as_run(const std::vector<double>& per_ch, const Runs& runs) {
  constexpr int64_t lanes = Vec<scalar_t>::size();
  std::vector<Vec<scalar_t>> out(runs.vectors);
  scalar_t buffer[lanes];
  for (int64_t v = 0; v < runs.vectors; ++v) {
    for (int64_t l = 0; l < lanes; ++l) buffer[l] = static_cast<scalar_t>(per_ch[(v * lanes + l) % runs.channels]);
    out[v] = Vec<scalar_t>::loadu(buffer);
  }
  return out;
}

// Calls f(offset, v, count) for every SIMD vector of a sample: its offset, its index v within the run and
// how many of its lanes are values; a compile-time `lanes` in the whole runs, so that their loads and
// stores compile to full-width ones.
template <int64_t lanes, typename F>
void for_each_vector(const Runs& runs, const F& f) {
  int64_t start = 0;
  for (; start + runs.period <= runs.values; start += runs.period) {
    for (int64_t v = 0; v < runs.vectors; ++v) f(start + v * lanes, v, std::integral_constant<int64_t, lanes>{});
  }
  for (int64_t v = 0; start + v * lanes < runs.values; ++v) {
    f(start + v * lanes, v, std::min(lanes, runs.values - start - v * lanes));
  }
}

// Phi(u) = (1 + erf(u / sqrt 2)) / 2, the GELU's gate.
template <typename scalar_t>
Vec<scalar_t> gate(const Vec<scalar_t>& u) {
  return Vec<scalar_t>(0.5) * (Vec<scalar_t>(1) + (u * Vec<scalar_t>(M_SQRT1_2)).erf());
}

void check_channels_last(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && x.size(1) > 0 && x.size(2) > 0, op,
              ": x must be a contiguous (B, N, C) tensor with N, C > 0, got sizes ", x.sizes());
}

// x (B, N, C) -> (GELU((x - mean) * rstd), mean (B, C), rstd (B, C)), statistics over each channel's N values.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_gelu_channels_last(const at::Tensor& x, double eps) {
  check_channels_last(x, "norm_gelu_channels_last");
  const int64_t batch = x.size(0), n = x.size(1), c = x.size(2);
  at::Tensor y = at::empty_like(x), mean = at::empty({batch, c}, x.options()), rstd = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "norm_gelu_channels_last", [&] {
    using V = Vec<scalar_t>;
    constexpr int64_t lanes = V::size();
    const Runs runs(n, c, lanes);
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* xp = x.data_ptr<scalar_t>() + b * runs.values;
        scalar_t* yp = y.data_ptr<scalar_t>() + b * runs.values;
        std::vector<V> sums(runs.vectors, V(0));
        for_each_vector<lanes>(runs, [&](int64_t o, int64_t v, auto count) {
          sums[v] = sums[v] + V::set(V(0), V::loadu(xp + o, count), count);
        });
        std::vector<double> m = per_channel(sums, runs);
        for (double& value : m) value /= static_cast<double>(n);
        const std::vector<V> means = as_run<scalar_t>(m, runs);
        std::fill(sums.begin(), sums.end(), V(0));
        for_each_vector<lanes>(runs, [&](int64_t o, int64_t v, auto count) {
          const V d = V::set(V(0), V::loadu(xp + o, count) - means[v], count);  // tail lanes: 0, not -mean
          sums[v] = at::vec::fmadd(d, d, sums[v]);
        });
        std::vector<double> s = per_channel(sums, runs);
        for (int64_t ch = 0; ch < c; ++ch) {
          s[ch] = 1.0 / std::sqrt(s[ch] / static_cast<double>(n) + eps);
          mean.data_ptr<scalar_t>()[b * c + ch] = static_cast<scalar_t>(m[ch]);
          rstd.data_ptr<scalar_t>()[b * c + ch] = static_cast<scalar_t>(s[ch]);
        }
        const std::vector<V> scales = as_run<scalar_t>(s, runs);
        for_each_vector<lanes>(runs, [&](int64_t o, int64_t v, auto count) {
          const V u = (V::loadu(xp + o, count) - means[v]) * scales[v];
          (u * gate(u)).store(yp + o, count);
        });
      }
    });
  });
  return {y, mean, rstd};
}

// The gradient in x of norm_gelu_channels_last's output: with u the normalised x and h = grad * GELU'(u),
// per (sample, channel) grad_x = rstd (h - mean(h) - u mean(h u)); GELU'(u) = Phi(u) + u exp(-u^2 / 2) / sqrt(2 pi).
at::Tensor norm_gelu_channels_last_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                                            const at::Tensor& rstd) {
  check_channels_last(x, "norm_gelu_channels_last_backward");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.is_contiguous() && grad.scalar_type() == x.scalar_type(),
              "norm_gelu_channels_last_backward: grad must be a contiguous tensor of x's sizes and dtype");
  TORCH_CHECK(mean.numel() == x.size(0) * x.size(2) && rstd.numel() == mean.numel() && mean.is_contiguous() &&
                  rstd.is_contiguous() && mean.scalar_type() == x.scalar_type() &&
                  rstd.scalar_type() == x.scalar_type(),
              "norm_gelu_channels_last_backward: mean and rstd must hold one value of x's dtype per (B, C)");
  const int64_t batch = x.size(0), n = x.size(1), c = x.size(2);
  at::Tensor grad_x = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "norm_gelu_channels_last_backward", [&] {
    using V = Vec<scalar_t>;
    constexpr int64_t lanes = V::size();
    const Runs runs(n, c, lanes);
    const V density(1 / std::sqrt(2 * M_PI));
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* gp = grad.data_ptr<scalar_t>() + b * runs.values;
        const scalar_t* xp = x.data_ptr<scalar_t>() + b * runs.values;
        scalar_t* op = grad_x.data_ptr<scalar_t>() + b * runs.values;
        const auto gather = [&](const at::Tensor& t) {
          const scalar_t* p = t.data_ptr<scalar_t>() + b * c;
          return as_run<scalar_t>(std::vector<double>(p, p + c), runs);
        };
        const std::vector<V> means = gather(mean), scales = gather(rstd);
        std::vector<V> sum_h(runs.vectors, V(0)), sum_hu(runs.vectors, V(0));
        for_each_vector<lanes>(runs, [&](int64_t o, int64_t v, auto count) {  // h into grad_x, and its sums
          const V u = V::set(V(0), (V::loadu(xp + o, count) - means[v]) * scales[v], count);
          const V h = V::loadu(gp + o, count) * (gate(u) + u * density * (u * u * V(-0.5)).exp());
          h.store(op + o, count);
          sum_h[v] = sum_h[v] + V::set(V(0), h, count);
          sum_hu[v] = at::vec::fmadd(h, u, sum_hu[v]);
        });
        std::vector<double> mean_h = per_channel(sum_h, runs), mean_hu = per_channel(sum_hu, runs);
        for (int64_t ch = 0; ch < c; ++ch) {
          mean_h[ch] /= static_cast<double>(n);
          mean_hu[ch] /= static_cast<double>(n);
        }
        const std::vector<V> mh = as_run<scalar_t>(mean_h, runs), mhu = as_run<scalar_t>(mean_hu, runs);
        for_each_vector<lanes>(runs, [&](int64_t o, int64_t v, auto count) {
          const V u = (V::loadu(xp + o, count) - means[v]) * scales[v];
          (scales[v] * (V::loadu(op + o, count) - mh[v] - u * mhu[v])).store(op + o, count);
        });
      }
    });
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(veloxseg, m) {
  m.def("norm_gelu_channels_last(Tensor x, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("norm_gelu_channels_last_backward(Tensor grad, Tensor x, Tensor mean, Tensor rstd) -> Tensor");
}

TORCH_LIBRARY_IMPL(veloxseg, CPU, m) {
  m.impl("norm_gelu_channels_last", &norm_gelu_channels_last);
  m.impl("norm_gelu_channels_last_backward", &norm_gelu_channels_last_backward);
}
