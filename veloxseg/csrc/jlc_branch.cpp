// The conv branch of a JLC block with narrow groups, for CPUs: y = x + sum_k GELU(IN(conv_k(x))),
// every conv run on the width-folded input (W pairs as channels: twice as wide groups, which oneDNN
// runs near peak where 4-channel groups run at half of it), then one pass that normalises, applies
// GELU, sums and un-folds (interleaves the two W parities) straight into y.
//
// Why by hand: under torch.compile inductor lays the folded tensors out channels-last, where the
// un-fold becomes a scalar gather, and with the convs opaque its norms read channels-first conv
// outputs more slowly than what the fold saves; here the un-fold is folded into the last pass.
// Built by veloxseg/layers/cpu_kernels.py with torch.utils.cpp_extension.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

float vector_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// Mean and 1 / sqrt(biased variance + eps) of the 2 * size values in two planes (a channel's two parities).
std::pair<float, float> plane_pair_statistics(const float* even, const float* odd, int64_t size) {
  constexpr int64_t vec = Vec::size();
  Vec sum(0.f);
  for (int64_t m = 0; m < size; m += vec) {
    const int64_t count = std::min(vec, size - m);
    sum = sum + Vec::loadu(even + m, count) + Vec::loadu(odd + m, count);
  }
  const float mean = vector_sum(sum) / static_cast<float>(2 * size);
  Vec squares(0.f);
  for (int64_t m = 0; m < size; m += vec) {
    const int64_t count = std::min(vec, size - m);
    // Lanes past count load as 0: their (0 - mean) is masked out by subtracting only inside the count.
    const Vec e = Vec::set(Vec(0.f), Vec::loadu(even + m, count) - Vec(mean), count);
    const Vec o = Vec::set(Vec(0.f), Vec::loadu(odd + m, count) - Vec(mean), count);
    squares = at::vec::fmadd(e, e, at::vec::fmadd(o, o, squares));
  }
  const float variance = vector_sum(squares) / static_cast<float>(2 * size);
  return {mean, 1.f / std::sqrt(variance + 1e-5f)};
}

// Exact (erf) GELU. erf by the formula at::vec's erf() uses (Abramowitz-Stegun 7.1.26, absolute error
// 1.5e-7), with at::vec's inlined exp_u20 where erf() calls Sleef's exp: that call took about half of this
// kernel's time in a profile of veloxseg.optimize's batch-1 forward (1.33 M GELUs).
Vec gelu(const Vec& z) {
  const Vec x = z * Vec(static_cast<float>(M_SQRT1_2));
  const Vec a = x.abs();
  const Vec t = Vec(1.f) / at::vec::fmadd(Vec(0.3275911f), a, Vec(1.f));
  Vec r = at::vec::fmadd(Vec(1.061405429f), t, Vec(-1.453152027f));
  r = at::vec::fmadd(r, t, Vec(1.421413741f));
  r = at::vec::fmadd(r, t, Vec(-0.284496736f));
  r = at::vec::fmadd(r, t, Vec(0.254829592f));
  const Vec erf_abs = Vec(1.f) - r * t * (Vec(0.f) - x * x).exp_u20();  // erf(|x|)
  // 1 + erf(x): 1 + erf(|x|) for x >= 0, 1 - erf(|x|) below
  const Vec one_plus_erf = Vec::blendv(Vec(1.f) + erf_abs, Vec(1.f) - erf_abs, x < Vec(0.f));
  return z * Vec(0.5f) * one_plus_erf;
}

// weights and biases: already re-laid out for the folded input (veloxseg.layers.jlc.fold_conv_weight),
// (2 C, 2 C / groups, kd, kh, taps) and (2 C,); x: (B, C, D, H, W) float32, W even.
at::Tensor jlc_folded_branch(const at::Tensor& x_in, at::TensorList weights, at::TensorList biases, int64_t groups) {
  TORCH_CHECK(x_in.dim() == 5 && x_in.scalar_type() == at::kFloat,
              "jlc_folded_branch: x must be a float32 (B, C, D, H, W)");
  TORCH_CHECK(x_in.size(4) % 2 == 0, "jlc_folded_branch: the width must be even");
  TORCH_CHECK(!weights.empty() && weights.size() == biases.size(), "jlc_folded_branch: one bias per weight");
  const at::Tensor x = x_in.contiguous();
  const int64_t b = x.size(0), c = x.size(1), d = x.size(2), h = x.size(3), w2 = x.size(4) / 2;
  const at::Tensor folded =  // fold_width: channel 2c + s holds the voxels w = 2j + s
      x.view({b, c, d, h, w2, 2}).permute({0, 1, 5, 2, 3, 4}).reshape({b, 2 * c, d, h, w2}).contiguous();
  std::vector<at::Tensor> outputs;
  for (size_t k = 0; k < weights.size(); ++k) {
    const at::Tensor& weight = weights[k];
    TORCH_CHECK(weight.dim() == 5 && weight.size(0) == 2 * c, "jlc_folded_branch: weight ", k,
                " is not a folded conv weight");
    const std::vector<int64_t> padding = {weight.size(2) / 2, weight.size(3) / 2, weight.size(4) / 2};
    outputs.push_back(at::mkldnn_convolution(folded, weight.contiguous(), biases[k].contiguous(), padding, {1, 1, 1},
                                             {1, 1, 1}, groups)
                          .contiguous());
  }
  at::Tensor y = at::empty_like(x);
  const int64_t plane = d * h * w2;  // one parity of one channel
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, b * c, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> means(outputs.size()), rstds(outputs.size());
    std::vector<const float*> evens(outputs.size()), odds(outputs.size());
    for (int64_t channel = begin; channel < end; ++channel) {
      for (size_t k = 0; k < outputs.size(); ++k) {
        evens[k] = outputs[k].data_ptr<float>() + 2 * channel * plane;
        odds[k] = evens[k] + plane;
        std::tie(means[k], rstds[k]) = plane_pair_statistics(evens[k], odds[k], plane);
      }
      const float* xc = xp + channel * 2 * plane;
      float* yc = yp + channel * 2 * plane;
      constexpr int64_t vec = Vec::size();
      for (int64_t m = 0; m < plane; m += vec) {
        const int64_t count = std::min(vec, plane - m);
        Vec even(0.f), odd(0.f);
        for (size_t k = 0; k < outputs.size(); ++k) {
          even = even + gelu((Vec::loadu(evens[k] + m, count) - Vec(means[k])) * Vec(rstds[k]));
          odd = odd + gelu((Vec::loadu(odds[k] + m, count) - Vec(means[k])) * Vec(rstds[k]));
        }
        // Output voxel 2m + s of the channel's flattened (D, H, W) is parity s at folded position m.
        auto [low, high] = at::vec::interleave2<float>(even, odd);
        const int64_t low_count = std::min(vec, 2 * count), high_count = 2 * count - low_count;
        (Vec::loadu(xc + 2 * m, low_count) + low).store(yc + 2 * m, low_count);
        if (high_count > 0) (Vec::loadu(xc + 2 * m + vec, high_count) + high).store(yc + 2 * m + vec, high_count);
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(veloxseg, m) {
  m.def("jlc_folded_branch(Tensor x, Tensor[] weights, Tensor[] biases, int groups) -> Tensor");
}

TORCH_LIBRARY_IMPL(veloxseg, CPU, m) { m.impl("jlc_folded_branch", &jlc_folded_branch); }
