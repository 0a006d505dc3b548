// A 3^3 conv (stride 1, padding 1) of 8 channels into 8 on channels-last tensors, for CPUs: forward, input
// gradient and weight gradient. The detail path of the *_hr variants applies it at half resolution while
// training (2 x 8 x 32^3 at the default recipe), where oneDNN took 4.1 ms forward and about 9 ms backward
// (one thread, an AMD EPYC with AVX-512): 8 channels are too few for its blocked kernels. Here one output
// voxel's 8 channels are one 8-lane vector, each input value is broadcast against a weight row, and the
// input gradient is the same conv of the output gradient with the weights flipped and transposed.
// Written with GCC/Clang vector extensions (8 lanes of float or double) so that it builds on any CPU the
// other kernels build on. Built by veloxseg/layers/cpu_kernels.py with torch.utils.cpp_extension.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

namespace {

constexpr int64_t kChannels = 8;  // input and output channels
constexpr int64_t kTaps = 27;
constexpr int64_t kBlock = 4;  // output voxels a forward step keeps in registers

// One voxel's 8 channels (an attribute on a dependent type is ignored in an alias template: hence the traits).
template <typename T>
struct LanesOf;
template <>
struct LanesOf<float> {
  typedef float type __attribute__((vector_size(kChannels * sizeof(float))));
};
template <>
struct LanesOf<double> {
  typedef double type __attribute__((vector_size(kChannels * sizeof(double))));
};
template <typename T>
using Lanes = typename LanesOf<T>::type;

template <typename T>
Lanes<T> load(const T* p) {
  Lanes<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
void store(T* p, const Lanes<T>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// Shapes: x (B, D, H, W, 8); a row is the W voxels at one (b, d, h).
struct Geometry {
  int64_t batch, depth, height, width;
  int64_t rows() const { return batch * depth * height; }
  // Offset of the row that tap (kd, kh, kw) reads for output row `row` = (b, d, h), or -1 where that row lies
  // in the zero padding.
  int64_t tap_row(int64_t row, int64_t tap) const {
    const int64_t d = row / height % depth + tap / 9 - 1, h = row % height + tap / 3 % 3 - 1;
    if (d < 0 || d >= depth || h < 0 || h >= height) return -1;
    return ((row / (depth * height) * depth + d) * height + h) * width * kChannels;
  }
  // The output voxels [first, last) whose tap reads inside the row (kw = 0 skips the first, 2 the last).
  int64_t first(int64_t tap) const { return tap % 3 == 0 ? 1 : 0; }
  int64_t last(int64_t tap) const { return tap % 3 == 2 ? width - 1 : width; }
  // The shift of tap (kd, kh, kw) within a row: kw - 1 voxels.
  int64_t shift(int64_t tap) const { return (tap % 3 - 1) * kChannels; }
};

// out (B, D, H, W, 8) = bias + sum over taps of x[voxel + tap - 1] @ weight[tap] (zero outside x), weight
// (27, 8 in, 8 out). Each output row stays in L1 while the 27 taps add into it, four voxels at a time.
template <typename T>
void conv_rows(const Geometry& g, const T* x, const T* weight, const T* bias, T* out) {
  using V = Lanes<T>;
  at::parallel_for(0, g.rows(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      T* o = out + row * g.width * kChannels;
      const V b = bias ? load(bias) : V{};
      for (int64_t w = 0; w < g.width; ++w) store(o + w * kChannels, b);
      for (int64_t tap = 0; tap < kTaps; ++tap) {
        const int64_t offset = g.tap_row(row, tap);
        if (offset < 0) continue;
        const T* in = x + offset + g.shift(tap);
        V rows[kChannels];
        for (int64_t c = 0; c < kChannels; ++c) rows[c] = load(weight + (tap * kChannels + c) * kChannels);
        int64_t w = g.first(tap);
        const int64_t last = g.last(tap);
        for (; w + kBlock <= last; w += kBlock) {
          const T* xv = in + w * kChannels;
          T* y = o + w * kChannels;
          V a[kBlock];
          for (int64_t j = 0; j < kBlock; ++j) a[j] = load(y + j * kChannels);
          for (int64_t c = 0; c < kChannels; ++c) {
            for (int64_t j = 0; j < kBlock; ++j) a[j] += xv[j * kChannels + c] * rows[c];
          }
          for (int64_t j = 0; j < kBlock; ++j) store(y + j * kChannels, a[j]);
        }
        for (; w < last; ++w) {
          V a = load(o + w * kChannels);
          for (int64_t c = 0; c < kChannels; ++c) a += in[w * kChannels + c] * rows[c];
          store(o + w * kChannels, a);
        }
      }
    }
  });
}

// grad_weight (27, 8 in, 8 out) = sum over voxels of x[voxel + tap - 1] (outer) grad[voxel]. Each thread
// sums its rows into its own copy, a (b, d) plane of grad at a time (it stays in cache over the 27 taps).
template <typename T>
void weight_grad_rows(const Geometry& g, const T* x, const T* grad, T* grad_weight) {
  using V = Lanes<T>;
  const int64_t planes = g.batch * g.depth, per_tap = kChannels * kChannels;
  std::vector<T> partial(at::get_num_threads() * kTaps * per_tap, T(0));
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    T* sums = partial.data() + at::get_thread_num() * kTaps * per_tap;
    for (int64_t plane = begin; plane < end; ++plane) {
      for (int64_t tap = 0; tap < kTaps; ++tap) {
        V acc[kChannels];
        for (int64_t c = 0; c < kChannels; ++c) acc[c] = load(sums + tap * per_tap + c * kChannels);
        for (int64_t row = plane * g.height; row < (plane + 1) * g.height; ++row) {
          const int64_t offset = g.tap_row(row, tap);
          if (offset < 0) continue;
          const T *in = x + offset + g.shift(tap), *gr = grad + row * g.width * kChannels;
          for (int64_t w = g.first(tap); w < g.last(tap); ++w) {
            const V gv = load(gr + w * kChannels);
            for (int64_t c = 0; c < kChannels; ++c) acc[c] += in[w * kChannels + c] * gv;
          }
        }
        for (int64_t c = 0; c < kChannels; ++c) store(sums + tap * per_tap + c * kChannels, acc[c]);
      }
    }
  });
  std::fill(grad_weight, grad_weight + kTaps * per_tap, T(0));
  for (size_t i = 0; i < partial.size(); ++i) grad_weight[i % (kTaps * per_tap)] += partial[i];
}

Geometry check(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 5 && x.size(4) == kChannels && x.is_contiguous(), op,
              ": x must be a contiguous (B, D, H, W, 8) tensor, got sizes ", x.sizes());
  return {x.size(0), x.size(1), x.size(2), x.size(3)};
}

void check_weight(const at::Tensor& weight, const at::Tensor& x, const char* op) {
  TORCH_CHECK(weight.sizes() == at::IntArrayRef({kTaps, kChannels, kChannels}) && weight.is_contiguous() &&
                  weight.scalar_type() == x.scalar_type(),
              op, ": weight must be a contiguous (27, 8, 8) tensor of x's dtype, got sizes ", weight.sizes());
}

// x (B, D, H, W, 8), weight (27 taps (kd, kh, kw), 8 in, 8 out), bias (8,) or None -> (B, D, H, W, 8).
at::Tensor conv3x3_channels_last(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const Geometry g = check(x, "conv3x3_channels_last");
  check_weight(weight, x, "conv3x3_channels_last");
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(
      !has_bias || (bias->numel() == kChannels && bias->is_contiguous() && bias->scalar_type() == x.scalar_type()),
      "conv3x3_channels_last: bias must be a contiguous (8,) tensor of x's dtype");
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv3x3_channels_last", [&] {
    conv_rows<scalar_t>(g, x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                        has_bias ? bias->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>());
  });
  return out;
}

// The gradients in x and in the weight of conv3x3_channels_last(x, weight, bias) given grad (B, D, H, W, 8).
std::tuple<at::Tensor, at::Tensor> conv3x3_channels_last_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                  const at::Tensor& weight) {
  const Geometry g = check(x, "conv3x3_channels_last_backward");
  check_weight(weight, x, "conv3x3_channels_last_backward");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.is_contiguous() && grad.scalar_type() == x.scalar_type(),
              "conv3x3_channels_last_backward: grad must be a contiguous tensor of x's sizes and dtype");
  // grad_x[v] = sum over taps t of grad[v - t + 1] @ weight[t]^T: the conv of grad with the taps flipped and
  // the weights transposed.
  const at::Tensor flipped = weight.flip(0).transpose(1, 2).contiguous();
  at::Tensor grad_x = at::empty_like(x), grad_weight = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv3x3_channels_last_backward", [&] {
    const scalar_t *gp = grad.data_ptr<scalar_t>(), *xp = x.data_ptr<scalar_t>();
    conv_rows<scalar_t>(g, gp, flipped.data_ptr<scalar_t>(), nullptr, grad_x.data_ptr<scalar_t>());
    weight_grad_rows<scalar_t>(g, xp, gp, grad_weight.data_ptr<scalar_t>());
  });
  return {grad_x, grad_weight};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(veloxseg, m) {
  m.def("conv3x3_channels_last(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("conv3x3_channels_last_backward(Tensor grad, Tensor x, Tensor weight) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(veloxseg, CPU, m) {
  m.impl("conv3x3_channels_last", &conv3x3_channels_last);
  m.impl("conv3x3_channels_last_backward", &conv3x3_channels_last_backward);
}
