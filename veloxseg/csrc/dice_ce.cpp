// Soft Dice + cross-entropy over softmax probabilities, for CPUs: one pass over the logits forward
// (per-class sums and the cross-entropy), one pass backward (the closed-form gradient), softmax
// recomputed in registers. veloxseg.losses.dice_ce_loss turns the sums into the loss and the
// per-class coefficients of its gradient.
//
// Why by hand: written with PyTorch ops, the loss (log-softmax, exp, gathers and scatter-adds by label,
// and about six passes backward) makes a dozen passes over (B, C, *spatial) tensors; MONAI's DiceCELoss
// about twenty. Built by veloxseg/layers/cpu_kernels.py with torch.utils.cpp_extension.

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
constexpr int64_t kBlock = 4096;  // voxels per task: float partial sums stay short, then go to double

void check_inputs(const at::Tensor& logits, const at::Tensor& labels, const char* op) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 3 && logits.is_contiguous(), op,
              ": logits must be a contiguous float32 (B, C, N)");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 2 && labels.is_contiguous() &&
                  labels.size(0) == logits.size(0) && labels.size(1) == logits.size(2),
              op, ": labels must be a contiguous int64 (B, N) for logits (B, C, N)");
}

// The labels of voxels [n, n + count) as floats (lanes past count: -1, no class).
Vec load_labels(const int64_t* labels, int64_t count) {
  alignas(64) float values[Vec::size()];
  for (int64_t i = 0; i < Vec::size(); ++i) values[i] = i < count ? static_cast<float>(labels[i]) : -1.f;
  return Vec::loadu(values);
}

// Softmax of voxels [n, n + count) into p[0..C); returns log of the sum of exp(z - max) and writes the max.
Vec softmax(const float* z, int64_t voxels, int64_t classes, int64_t count, Vec* p, Vec& max) {
  max = Vec(-std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < classes; ++c) {
    p[c] = Vec::loadu(z + c * voxels, count);
    max = at::vec::maximum(max, p[c]);
  }
  Vec sum(0.f);
  for (int64_t c = 0; c < classes; ++c) {
    p[c] = (p[c] - max).exp_u20();
    sum = sum + p[c];
  }
  const Vec inverse = sum.reciprocal();
  for (int64_t c = 0; c < classes; ++c) p[c] = p[c] * inverse;
  return sum.log();
}

// Per (sample, block): [intersection (C), predicted (C), ground (C), cross-entropy sum], float64, as
// a (B, blocks, 3 C + 1) tensor summed by the caller (deterministic for any thread count).
at::Tensor dice_ce_sums(const at::Tensor& logits, const at::Tensor& labels) {
  check_inputs(logits, labels, "dice_ce_sums");
  const int64_t batch = logits.size(0), classes = logits.size(1), voxels = logits.size(2);
  const int64_t blocks = (voxels + kBlock - 1) / kBlock, width = 3 * classes + 1;
  at::Tensor sums = at::zeros({batch, blocks, width}, logits.options().dtype(at::kDouble));
  const float* zp = logits.data_ptr<float>();
  const int64_t* yp = labels.data_ptr<int64_t>();
  double* sp = sums.data_ptr<double>();
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<Vec> p(classes), intersection(classes), predicted(classes), ground(classes);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, first = (task % blocks) * kBlock;
      const int64_t last = std::min(voxels, first + kBlock);
      std::fill(intersection.begin(), intersection.end(), Vec(0.f));
      std::fill(predicted.begin(), predicted.end(), Vec(0.f));
      std::fill(ground.begin(), ground.end(), Vec(0.f));
      Vec cross_entropy(0.f), max;
      for (int64_t n = first; n < last; n += Vec::size()) {
        const int64_t count = std::min<int64_t>(Vec::size(), last - n);
        const float* z = zp + b * classes * voxels + n;
        const Vec label = load_labels(yp + b * voxels + n, count);
        const Vec log_sum = softmax(z, voxels, classes, count, p.data(), max);
        Vec picked_logit(0.f);
        for (int64_t c = 0; c < classes; ++c) {
          const Vec is_class = label == Vec(static_cast<float>(c));  // all bits set where the label is c
          predicted[c] = predicted[c] + Vec::set(Vec(0.f), p[c], count);
          intersection[c] = intersection[c] + (p[c] & is_class);
          ground[c] = ground[c] + (Vec(1.f) & is_class);
          picked_logit = picked_logit + (Vec::loadu(z + c * voxels, count) & is_class);
        }
        // -log p_y = log sum exp(z - max) + max - z_y
        cross_entropy = cross_entropy + Vec::set(Vec(0.f), log_sum + max - picked_logit, count);
      }
      auto reduce = [](const Vec& v) {
        return static_cast<double>(at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, v));
      };
      double* out = sp + task * width;
      for (int64_t c = 0; c < classes; ++c) {
        out[c] = reduce(intersection[c]);
        out[classes + c] = reduce(predicted[c]);
        out[2 * classes + c] = reduce(ground[c]);
      }
      out[3 * classes] = reduce(cross_entropy);
    }
  });
  return sums;
}

// d loss / d logits = p (k + ce - s) + [y = c] (a_y p_y - ce), s = sum_j p_j k_j + a_y p_y, with the
// upstream gradient already folded into k, a (B, C float32) and ce (the cross-entropy's 1 / N).
at::Tensor dice_ce_backward(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& k_in,
                            const at::Tensor& a_in, double ce_scale) {
  check_inputs(logits, labels, "dice_ce_backward");
  const int64_t batch = logits.size(0), classes = logits.size(1), voxels = logits.size(2);
  const at::Tensor k = k_in.to(at::kFloat).contiguous(), a = a_in.to(at::kFloat).contiguous();
  TORCH_CHECK(k.sizes() == at::IntArrayRef({batch, classes}) && a.sizes() == k.sizes(),
              "dice_ce_backward: k and a must be (B, C)");
  at::Tensor grad = at::empty_like(logits);
  const int64_t blocks = (voxels + kBlock - 1) / kBlock;
  const float* zp = logits.data_ptr<float>();
  const int64_t* yp = labels.data_ptr<int64_t>();
  const float* kp = k.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  float* gp = grad.data_ptr<float>();
  const Vec ce(static_cast<float>(ce_scale));
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<Vec> p(classes), is_class(classes);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, first = (task % blocks) * kBlock;
      const int64_t last = std::min(voxels, first + kBlock);
      for (int64_t n = first; n < last; n += Vec::size()) {
        const int64_t count = std::min<int64_t>(Vec::size(), last - n);
        const Vec label = load_labels(yp + b * voxels + n, count);
        Vec max;
        softmax(zp + b * classes * voxels + n, voxels, classes, count, p.data(), max);
        Vec weighted(0.f), picked(0.f);  // sum_j p_j k_j, a_y p_y
        for (int64_t c = 0; c < classes; ++c) {
          is_class[c] = label == Vec(static_cast<float>(c));
          weighted = at::vec::fmadd(p[c], Vec(kp[b * classes + c]), weighted);
          picked = picked + (p[c] * Vec(ap[b * classes + c]) & is_class[c]);
        }
        const Vec shift = ce - weighted - picked;
        const Vec at_label = picked - ce;
        for (int64_t c = 0; c < classes; ++c) {
          const Vec g = at::vec::fmadd(p[c], Vec(kp[b * classes + c]) + shift, at_label & is_class[c]);
          g.store(gp + (b * classes + c) * voxels + n, count);
        }
      }
    }
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(veloxseg, m) {
  m.def("dice_ce_sums(Tensor logits, Tensor labels) -> Tensor");
  m.def("dice_ce_backward(Tensor logits, Tensor labels, Tensor k, Tensor a, float ce_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(veloxseg, CPU, m) {
  m.impl("dice_ce_sums", &dice_ce_sums);
  m.impl("dice_ce_backward", &dice_ce_backward);
}
