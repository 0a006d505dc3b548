// GELU(instance norm(x)) for CPUs, forward and backward, one (sample, channel) row at a time: the norm's
// statistics, the normalised value and the GELU in registers, where PyTorch's layer norm and GELU write
// and re-read the normalised tensor (and save it for the backward) and take two more passes back.
// JLC blocks and the detail path apply it after every spatial conv. Built by
// veloxseg/layers/cpu_kernels.py with torch.utils.cpp_extension.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

namespace {

template <typename scalar_t>
using Vec = at::vec::Vectorized<scalar_t>;

template <typename scalar_t>
scalar_t reduce_sum(const Vec<scalar_t>& v) {
  return at::vec::vec_reduce_all<scalar_t>([](Vec<scalar_t>& a, Vec<scalar_t>& b) { return a + b; }, v);
}

// Mean and 1 / sqrt(biased variance + eps) of a row of n values (two passes: the row stays in cache).
template <typename scalar_t>
std::pair<scalar_t, scalar_t> row_statistics(const scalar_t* x, int64_t n, double eps) {
  constexpr int64_t lanes = Vec<scalar_t>::size();
  Vec<scalar_t> sum(0);
  for (int64_t j = 0; j < n; j += lanes) sum = sum + Vec<scalar_t>::loadu(x + j, std::min(lanes, n - j));
  const scalar_t mean = reduce_sum(sum) / static_cast<scalar_t>(n);
  Vec<scalar_t> squares(0);
  for (int64_t j = 0; j < n; j += lanes) {
    const int64_t count = std::min(lanes, n - j);
    const Vec<scalar_t> centred = Vec<scalar_t>::loadu(x + j, count) - Vec<scalar_t>(mean);
    const Vec<scalar_t> d = Vec<scalar_t>::set(Vec<scalar_t>(0), centred, count);  // tail lanes: 0, not -mean
    squares = at::vec::fmadd(d, d, squares);
  }
  const double variance = static_cast<double>(reduce_sum(squares)) / static_cast<double>(n);
  return {mean, static_cast<scalar_t>(1.0 / std::sqrt(variance + eps))};
}

// Phi(u) = (1 + erf(u / sqrt 2)) / 2, the GELU's gate.
template <typename scalar_t>
Vec<scalar_t> gate(const Vec<scalar_t>& u) {
  return Vec<scalar_t>(0.5) * (Vec<scalar_t>(1) + (u * Vec<scalar_t>(M_SQRT1_2)).erf());
}

void check_rows(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && x.size(2) > 0, op,
              ": x must be a contiguous (B, C, N) tensor with N > 0, got sizes ", x.sizes());
}

// x (B, C, N) -> (GELU((x - mean) * rstd), mean (B, C), rstd (B, C)), statistics over each row's N values.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_gelu(const at::Tensor& x, double eps) {
  check_rows(x, "norm_gelu");
  const int64_t rows = x.size(0) * x.size(1), n = x.size(2);
  at::Tensor y = at::empty_like(x), mean = at::empty({x.size(0), x.size(1)}, x.options()), rstd = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "norm_gelu", [&] {
    constexpr int64_t lanes = Vec<scalar_t>::size();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t *yp = y.data_ptr<scalar_t>(), *mp = mean.data_ptr<scalar_t>(), *rp = rstd.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const auto [m, s] = row_statistics(xp + r * n, n, eps);
        mp[r] = m;
        rp[r] = s;
        for (int64_t j = 0; j < n; j += lanes) {
          const int64_t count = std::min(lanes, n - j);
          const Vec<scalar_t> u = (Vec<scalar_t>::loadu(xp + r * n + j, count) - Vec<scalar_t>(m)) * Vec<scalar_t>(s);
          (u * gate(u)).store(yp + r * n + j, count);
        }
      }
    });
  });
  return {y, mean, rstd};
}

// The gradient in x of norm_gelu's output: with u the normalised x and h = grad * GELU'(u), per row
// grad_x = rstd (h - mean(h) - u mean(h u)); GELU'(u) = Phi(u) + u exp(-u^2 / 2) / sqrt(2 pi).
at::Tensor norm_gelu_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                              const at::Tensor& rstd) {
  check_rows(x, "norm_gelu_backward");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.is_contiguous() && grad.scalar_type() == x.scalar_type(),
              "norm_gelu_backward: grad must be a contiguous tensor of x's sizes and dtype");
  TORCH_CHECK(mean.numel() == x.size(0) * x.size(1) && rstd.numel() == mean.numel() && mean.is_contiguous() &&
                  rstd.is_contiguous(),
              "norm_gelu_backward: mean and rstd must hold one value per (B, C) row");
  const int64_t rows = x.size(0) * x.size(1), n = x.size(2);
  at::Tensor grad_x = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "norm_gelu_backward", [&] {
    using V = Vec<scalar_t>;
    constexpr int64_t lanes = V::size();
    const scalar_t *gp = grad.data_ptr<scalar_t>(), *xp = x.data_ptr<scalar_t>();
    const scalar_t *mp = mean.data_ptr<scalar_t>(), *rp = rstd.data_ptr<scalar_t>();
    scalar_t* op = grad_x.data_ptr<scalar_t>();
    const V density(1 / std::sqrt(2 * M_PI));
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const V m(mp[r]), s(rp[r]);
        V sum_h(0), sum_hu(0);
        for (int64_t j = 0; j < n; j += lanes) {  // h into grad_x, and its two sums (tail lanes are 0)
          const int64_t count = std::min(lanes, n - j);
          const V u = V::set(V(0), (V::loadu(xp + r * n + j, count) - m) * s, count);
          const V slope = gate(u) + u * density * (u * u * V(-0.5)).exp();
          const V h = V::loadu(gp + r * n + j, count) * slope;
          h.store(op + r * n + j, count);
          sum_h = sum_h + h;
          sum_hu = at::vec::fmadd(h, u, sum_hu);
        }
        const V mean_h(reduce_sum(sum_h) / static_cast<scalar_t>(n));
        const V mean_hu(reduce_sum(sum_hu) / static_cast<scalar_t>(n));
        for (int64_t j = 0; j < n; j += lanes) {
          const int64_t count = std::min(lanes, n - j);
          const V u = (V::loadu(xp + r * n + j, count) - m) * s;
          (s * (V::loadu(op + r * n + j, count) - mean_h - u * mean_hu)).store(op + r * n + j, count);
        }
      }
    });
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(veloxseg, m) {
  m.def("norm_gelu(Tensor x, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("norm_gelu_backward(Tensor grad, Tensor x, Tensor mean, Tensor rstd) -> Tensor");
}

TORCH_LIBRARY_IMPL(veloxseg, CPU, m) {
  m.impl("norm_gelu", &norm_gelu);
  m.impl("norm_gelu_backward", &norm_gelu_backward);
}
