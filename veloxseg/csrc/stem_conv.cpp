// The detail path's stem for CPUs, forward and weight gradient: a 4^3 conv with stride 2 and padding 1 from
// C input channels into 8 (x (B, C, D, H, W), D, H, W even -> (B, 8, D/2, H/2, W/2)). oneDNN took 1.35-1.5
// ms forward and 1.5 ms for the weight gradient alone, 2.5-3.9 ms in a training step, at 2 x 1 x 64^3 (one
// thread, an AMD EPYC with AVX-512): one input channel leaves its blocked kernels little to block. Here the output is computed
// along W, a SIMD vector of output voxels at a time: with each input row split into its even and odd
// voxels (`phases`, zero-padded by one at both ends), the 4 taps along W read 4 contiguous runs, and each
// tap adds its 8 weights times one run into 8 accumulators (the weight gradient: 1.35 ms, no faster than
// oneDNN's alone, but it needs no layout change of the gradient). Built by veloxseg/layers/cpu_kernels.py with
// torch.utils.cpp_extension.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kOut = 8;   // output channels
constexpr int64_t kTaps = 64;  // 4^3 per input channel

// phases (B, C, D, H, 2, W/2 + 2): input row (b, c, d, h) as its even voxels then its odd ones, each run
// zero-padded by one voxel at both ends. Output voxel ow's tap kw reads run (kw + 1) % 2 at position
// ow + (kw + 1) / 2 (kw = 0: odd voxel 2 ow - 1; 1: even 2 ow; 2: odd 2 ow + 1; 3: even 2 ow + 2).
struct Geometry {
  int64_t batch, channels, depth, height, width;  // of the output: D/2, H/2, W/2
  int64_t run() const { return width + 2; }
  int64_t out_rows() const { return batch * depth * height; }
  // Offset of the phases of input row (b, c, 2 od + kd - 1, 2 oh + kh - 1), or -1 in the zero padding.
  int64_t input_row(int64_t b, int64_t c, int64_t od, int64_t oh, int64_t kd, int64_t kh) const {
    const int64_t d = 2 * od + kd - 1, h = 2 * oh + kh - 1;
    if (d < 0 || d >= 2 * depth || h < 0 || h >= 2 * height) return -1;
    return (((b * channels + c) * 2 * depth + d) * 2 * height + h) * 2 * run();
  }
  int64_t tap_offset(int64_t kw) const { return (kw + 1) % 2 * run() + (kw + 1) / 2; }
};

// out (B, 8, D/2, H/2, W/2) = bias + the conv; weight (8, C, 4, 4, 4).
template <typename scalar_t>
void forward_rows(const Geometry& g, const scalar_t* phases, const scalar_t* weight, const scalar_t* bias,
                  scalar_t* out) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t lanes = Vec::size();
  const int64_t plane = g.depth * g.height * g.width;
  at::parallel_for(0, g.out_rows(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (g.depth * g.height), od = row / g.height % g.depth, oh = row % g.height;
      for (int64_t ow = 0; ow < g.width; ow += lanes) {
        const int64_t count = std::min(lanes, g.width - ow);
        Vec acc[kOut];
        for (int64_t k = 0; k < kOut; ++k) acc[k] = Vec(bias[k]);
        for (int64_t c = 0; c < g.channels; ++c) {
          for (int64_t kdh = 0; kdh < 16; ++kdh) {
            const int64_t offset = g.input_row(b, c, od, oh, kdh / 4, kdh % 4);
            if (offset < 0) continue;
            for (int64_t kw = 0; kw < 4; ++kw) {
              const Vec in = Vec::loadu(phases + offset + g.tap_offset(kw) + ow, count);
              const scalar_t* w = weight + c * kTaps + kdh * 4 + kw;
              for (int64_t k = 0; k < kOut; ++k) acc[k] = at::vec::fmadd(Vec(w[k * g.channels * kTaps]), in, acc[k]);
            }
          }
        }
        scalar_t* o = out + b * kOut * plane + (od * g.height + oh) * g.width + ow;
        for (int64_t k = 0; k < kOut; ++k) acc[k].store(o + k * plane, count);
      }
    }
  });
}

// grad_weight (8, C, 4, 4, 4) = sum over output voxels of grad (B, 8, D/2, H/2, W/2) times each tap's input.
// A (b, od) plane of grad at a time, all taps over it (it stays in cache); each thread sums into its own copy.
template <typename scalar_t>
void weight_grad(const Geometry& g, const scalar_t* phases, const scalar_t* grad, scalar_t* grad_weight) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t lanes = Vec::size();
  const int64_t plane = g.depth * g.height * g.width, size = kOut * g.channels * kTaps;
  std::vector<scalar_t> partial(at::get_num_threads() * size, scalar_t(0));
  at::parallel_for(0, g.batch * g.depth, 1, [&](int64_t begin, int64_t end) {
    scalar_t* sums = partial.data() + at::get_thread_num() * size;
    for (int64_t bd = begin; bd < end; ++bd) {
      const int64_t b = bd / g.depth, od = bd % g.depth;
      for (int64_t c = 0; c < g.channels; ++c) {
        for (int64_t tap = 0; tap < kTaps; ++tap) {
          Vec acc[kOut];
          for (int64_t k = 0; k < kOut; ++k) acc[k] = Vec(0);
          for (int64_t oh = 0; oh < g.height; ++oh) {
            const int64_t offset = g.input_row(b, c, od, oh, tap / 16, tap / 4 % 4);
            if (offset < 0) continue;
            const scalar_t* in = phases + offset + g.tap_offset(tap % 4);
            const scalar_t* gr = grad + b * kOut * plane + (od * g.height + oh) * g.width;
            for (int64_t ow = 0; ow < g.width; ow += lanes) {
              const int64_t count = std::min(lanes, g.width - ow);
              const Vec x = Vec::loadu(in + ow, count);  // tail lanes are 0
              for (int64_t k = 0; k < kOut; ++k) {
                acc[k] = at::vec::fmadd(Vec::loadu(gr + k * plane + ow, count), x, acc[k]);
              }
            }
          }
          for (int64_t k = 0; k < kOut; ++k) {
            sums[(k * g.channels + c) * kTaps + tap] +=
                at::vec::vec_reduce_all<scalar_t>([](Vec& a, Vec& v) { return a + v; }, acc[k]);
          }
        }
      }
    }
  });
  std::fill(grad_weight, grad_weight + size, scalar_t(0));
  for (size_t i = 0; i < partial.size(); ++i) grad_weight[i % size] += partial[i];
}

Geometry check(const at::Tensor& phases, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(phases.dim() == 6 && phases.size(4) == 2 && phases.size(5) > 2 && phases.size(2) % 2 == 0 &&
                  phases.size(3) % 2 == 0 && phases.is_contiguous(),
              op, ": phases must be a contiguous (B, C, D, H, 2, W/2 + 2) tensor with D, H even, got sizes ",
              phases.sizes());
  TORCH_CHECK(weight.dim() == 5 && weight.size(0) == kOut && weight.size(1) == phases.size(1) &&
                  weight.size(2) == 4 && weight.size(3) == 4 && weight.size(4) == 4 && weight.is_contiguous() &&
                  weight.scalar_type() == phases.scalar_type(),
              op, ": weight must be a contiguous (8, C, 4, 4, 4) tensor of the input's dtype, got sizes ",
              weight.sizes());
  return {phases.size(0), phases.size(1), phases.size(2) / 2, phases.size(3) / 2, phases.size(5) - 2};
}

// phases (B, C, D, H, 2, W/2 + 2) (see Geometry), weight (8, C, 4, 4, 4), bias (8,) -> (B, 8, D/2, H/2, W/2).
at::Tensor stem_conv(const at::Tensor& phases, const at::Tensor& weight, const at::Tensor& bias) {
  const Geometry g = check(phases, weight, "stem_conv");
  TORCH_CHECK(bias.numel() == kOut && bias.is_contiguous() && bias.scalar_type() == phases.scalar_type(),
              "stem_conv: bias must be a contiguous (8,) tensor of the input's dtype");
  at::Tensor out = at::empty({g.batch, kOut, g.depth, g.height, g.width}, phases.options());
  AT_DISPATCH_FLOATING_TYPES(phases.scalar_type(), "stem_conv", [&] {
    forward_rows<scalar_t>(g, phases.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
                           out.data_ptr<scalar_t>());
  });
  return out;
}

// The gradient in the weight of stem_conv's output given grad (B, 8, D/2, H/2, W/2).
at::Tensor stem_conv_weight_grad(const at::Tensor& grad, const at::Tensor& phases, const at::Tensor& weight) {
  const Geometry g = check(phases, weight, "stem_conv_weight_grad");
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({g.batch, kOut, g.depth, g.height, g.width}) && grad.is_contiguous() &&
                  grad.scalar_type() == phases.scalar_type(),
              "stem_conv_weight_grad: grad must be a contiguous (B, 8, D/2, H/2, W/2) tensor of the input's dtype");
  at::Tensor grad_weight = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES(phases.scalar_type(), "stem_conv_weight_grad", [&] {
    weight_grad<scalar_t>(g, phases.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), grad_weight.data_ptr<scalar_t>());
  });
  return grad_weight;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(veloxseg, m) {
  m.def("stem_conv(Tensor phases, Tensor weight, Tensor bias) -> Tensor");
  m.def("stem_conv_weight_grad(Tensor grad, Tensor phases, Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(veloxseg, CPU, m) {
  m.impl("stem_conv", &stem_conv);
  m.impl("stem_conv_weight_grad", &stem_conv_weight_grad);
}
