// Paired-window attention while training, forward and backward for CPUs: the windows of every scale
// max-pooled and gathered, attention with the relative position bias in each window, and the result
// resized back (trilinear, align_corners) into place, one window at a time with every intermediate in
// cache. Between the q/k/v projection and the output projection of a PWA layer.
//
// Why by hand: as PyTorch ops this part of a layer is about a hundred small ops and as many autograd
// nodes (per scale a permute, a max pool, a window copy; bias gathers and repeats; batched GEMMs on
// windows of 8-64 tokens; per scale a resize GEMM and a scatter copy), which cost more than their FLOPs
// on these shapes. Here it is one op forward (`pwa_train`) and one backward (`pwa_train_backward`).
// Built by veloxseg/layers/cpu_kernels.py with torch.utils.cpp_extension.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace {

// One PWA layer's windows. projected (M, B, D, H, W, channels): each group's [q | k | v] projection, q and
// k read as (scale, head, qk), v as (scale, head, v); a window's M*L tokens hold, per token, [q | k | v] of
// its scale (width() values), and its output (M*L, heads * v) goes to channels (scale, head, v) of out.
struct Geometry {
  int64_t groups, batch, grid[3], channels, heads, qk, v, scales, tokens[3], length;
  std::vector<int64_t> window, pool, first;  // window and pool: 3 per scale; first: first window of each scale

  int64_t width() const { return heads * (2 * qk + v); }
  int64_t span() const { return groups * length; }
  int64_t out_channels() const { return scales * heads * v; }
  int64_t windows() const { return first.back(); }
  std::vector<int64_t> out_sizes() const { return {groups, batch, grid[0], grid[1], grid[2], out_channels()}; }
  int64_t voxel(int64_t m, int64_t b, int64_t d, int64_t h, int64_t w) const {
    return (((m * batch + b) * grid[0] + d) * grid[1] + h) * grid[2] + w;
  }
};

Geometry make_geometry(at::IntArrayRef projected, const at::Tensor& table, const at::Tensor& index,
                       at::IntArrayRef windows, at::IntArrayRef pools, int64_t heads, int64_t qk, int64_t v) {
  TORCH_CHECK(projected.size() == 6, "pwa_train: projected must be (M, B, D, H, W, C), got ", projected);
  TORCH_CHECK(windows.size() == pools.size() && !windows.empty() && windows.size() % 3 == 0,
              "pwa_train: windows and pools need 3 sizes per scale");
  TORCH_CHECK(std::all_of(pools.begin(), pools.end(), [](int64_t p) { return p > 0; }) &&
                  std::all_of(windows.begin(), windows.end(), [](int64_t w) { return w > 0; }),
              "pwa_train: windows and pools must be positive");
  Geometry g;
  g.groups = projected[0], g.batch = projected[1], g.channels = projected[5];
  g.heads = heads, g.qk = qk, g.v = v, g.scales = static_cast<int64_t>(windows.size()) / 3;
  g.window = windows.vec(), g.pool = pools.vec();
  g.first = {0};
  g.length = 1;
  for (int64_t a = 0; a < 3; ++a) {
    g.grid[a] = projected[2 + a];
    g.tokens[a] = windows[a] / pools[a];
    g.length *= g.tokens[a];
  }
  for (int64_t j = 0; j < g.scales; ++j) {
    int64_t count = g.batch;
    for (int64_t a = 0; a < 3; ++a) {
      const int64_t w = windows[3 * j + a], p = pools[3 * j + a];
      TORCH_CHECK(w % p == 0 && w / p == g.tokens[a] && g.grid[a] % w == 0,
                  "pwa_train: scale ", j, "'s window and pool do not tile the grid into ", g.tokens[a], " tokens");
      count *= g.grid[a] / w;
    }
    g.first.push_back(g.first.back() + count);
  }
  TORCH_CHECK(g.channels == g.scales * heads * (2 * qk + v), "pwa_train: projected has ", g.channels,
              " channels, not scales * heads * (2 qk + v)");
  TORCH_CHECK(table.dim() == 2 && table.size(1) == heads && table.is_contiguous(),
              "pwa_train: table must be a contiguous (R, heads) tensor");
  TORCH_CHECK(index.scalar_type() == at::kLong && index.is_contiguous() &&
                  index.sizes() == at::IntArrayRef({g.length, g.length}),
              "pwa_train: index must be a contiguous int64 (L, L) tensor");
  const int64_t* entries = index.data_ptr<int64_t>();
  TORCH_CHECK(std::all_of(entries, entries + index.numel(), [&](int64_t e) { return e >= 0 && e < table.size(0); }),
              "pwa_train: index out of the table's range");
  return g;
}

void check_resize(const Geometry& g, const std::vector<at::Tensor>& resize, at::ScalarType dtype) {
  TORCH_CHECK(static_cast<int64_t>(resize.size()) == g.scales, "pwa_train: one resize matrix per scale");
  for (int64_t j = 0; j < g.scales; ++j) {
    const int64_t voxels = g.window[3 * j] * g.window[3 * j + 1] * g.window[3 * j + 2];
    TORCH_CHECK(resize[j].scalar_type() == dtype && resize[j].is_contiguous() &&
                    resize[j].sizes() == at::IntArrayRef({voxels, g.length}),
                "pwa_train: resize matrix ", j, " must be contiguous (window voxels, L) of the input's dtype");
  }
}

// Where window w sits: its scale, sample and the voxel of its first corner.
struct Place {
  int64_t scale, b, corner[3];
  const int64_t *window, *pool;
};

Place locate(const Geometry& g, int64_t w) {
  Place p;
  p.scale = std::upper_bound(g.first.begin(), g.first.end(), w) - g.first.begin() - 1;
  p.window = &g.window[3 * p.scale], p.pool = &g.pool[3 * p.scale];
  int64_t rest = w - g.first[p.scale];
  for (int64_t a = 2; a >= 0; --a) {
    const int64_t count = g.grid[a] / p.window[a];
    p.corner[a] = (rest % count) * p.window[a];
    rest /= count;
  }
  p.b = rest;
  return p;
}

// The head count and widths, compile-time constants where not 0 (loops over them unroll and vectorise).
template <int64_t H, int64_t QK, int64_t V>
struct Widths {
  int64_t h_ = H, qk_ = QK, v_ = V;
  int64_t heads() const { return H > 0 ? H : h_; }
  int64_t qk() const { return QK > 0 ? QK : qk_; }
  int64_t v() const { return V > 0 ? V : v_; }
  int64_t width() const { return heads() * (2 * qk() + v()); }
  int64_t hv() const { return heads() * v(); }
};

// f(widths) with the widths of veloxseg's PWA levels fixed at compile time, others at run time.
template <typename F>
void dispatch_widths(const Geometry& g, F&& f) {
  if (g.heads == 1 && g.qk == 4 && g.v == 4) return f(Widths<1, 4, 4>{});
  if (g.heads == 2 && g.qk == 8 && g.v == 8) return f(Widths<2, 8, 8>{});
  if (g.heads == 2 && g.qk == 8 && g.v == 16) return f(Widths<2, 8, 16>{});
  if (g.heads == 4 && g.qk == 16 && g.v == 32) return f(Widths<4, 16, 32>{});
  f(Widths<0, 0, 0>{g.heads, g.qk, g.v});
}

// f(first column, first channel, length) for the three runs of projected's channels that make a token's
// [q | k | v] columns at scale j.
template <typename W, typename F>
void for_each_run(const Geometry& g, const W& wd, int64_t j, F&& f) {
  const int64_t qk_cols = wd.heads() * wd.qk(), all_qk = g.scales * qk_cols, v_cols = wd.hv();
  f(0, j * qk_cols, qk_cols);
  f(qk_cols, all_qk + j * qk_cols, qk_cols);
  f(2 * qk_cols, 2 * all_qk + j * v_cols, v_cols);
}

// f(m, r, voxel) for window voxel r = (r1 * w2 + r2) * w3 + r3 of every group m, voxel its index in
// projected's (M, B, D, H, W) voxels.
template <typename F>
void for_each_voxel(const Geometry& g, const Place& p, F&& f) {
  const int64_t group_voxels = g.batch * g.grid[0] * g.grid[1] * g.grid[2];
  for (int64_t m = 0; m < g.groups; ++m)
    for (int64_t r1 = 0, r = 0; r1 < p.window[0]; ++r1)
      for (int64_t r2 = 0; r2 < p.window[1]; ++r2) {
        const int64_t row = m * group_voxels + g.voxel(0, p.b, p.corner[0] + r1, p.corner[1] + r2, p.corner[2]);
        for (int64_t r3 = 0; r3 < p.window[2]; ++r3, ++r) f(m, r, row + r3);
      }
}

// y += a * x over n values (restrict: no alias checks; a version with at::vec and masked tails measured slower).
template <typename scalar_t>
inline void axpy(int64_t n, scalar_t a, const scalar_t* __restrict__ x, scalar_t* __restrict__ y) {
  for (int64_t c = 0; c < n; ++c) y[c] += a * x[c];
}

// Max-pool window w's tokens of every group: tokens (T, width), argmax (T, width) the voxels they came from.
// As max_pool3d: the first maximum, NaN wins.
template <typename scalar_t, typename W>
void gather(const Geometry& g, const W& wd, const Place& p, const scalar_t* projected, scalar_t* tokens,
            int32_t* argmax) {
  const int64_t width = wd.width(), group_voxels = g.batch * g.grid[0] * g.grid[1] * g.grid[2];
  for (int64_t m = 0; m < g.groups; ++m) {
    for (int64_t l = 0; l < g.length; ++l) {
      const int64_t t3 = l % g.tokens[2], t2 = (l / g.tokens[2]) % g.tokens[1], t1 = l / (g.tokens[2] * g.tokens[1]);
      scalar_t* best = tokens + (m * g.length + l) * width;
      int32_t* arg = argmax + (m * g.length + l) * width;
      bool first = true;
      for (int64_t u1 = 0; u1 < p.pool[0]; ++u1)
        for (int64_t u2 = 0; u2 < p.pool[1]; ++u2)
          for (int64_t u3 = 0; u3 < p.pool[2]; ++u3) {
            const int64_t vox = m * group_voxels + g.voxel(0, p.b, p.corner[0] + t1 * p.pool[0] + u1,
                                                           p.corner[1] + t2 * p.pool[1] + u2,
                                                           p.corner[2] + t3 * p.pool[2] + u3);
            const int32_t index = static_cast<int32_t>(vox);
            for_each_run(g, wd, p.scale, [&](int64_t column, int64_t channel, int64_t length) {
              const scalar_t* src = projected + vox * g.channels + channel;
              scalar_t* top = best + column;
              int32_t* at = arg + column;
              for (int64_t c = 0; c < length; ++c) {
                const bool take = first || src[c] > top[c] || src[c] != src[c];
                top[c] = take ? src[c] : top[c];
                at[c] = take ? index : at[c];
              }
            });
            first = false;
          }
    }
  }
}

// Head h's keys or values of one window transposed: (T, width) columns [column, column + count) -> (count, T).
template <typename scalar_t>
void transpose(const scalar_t* tokens, int64_t span, int64_t width, int64_t column, int64_t count, scalar_t* out) {
  for (int64_t j = 0; j < span; ++j)
    for (int64_t c = 0; c < count; ++c) out[c * span + j] = tokens[j * width + column + c];
}

// row[j] = exp(row[j] - max(row)) in place (the vectorised exp that PyTorch's softmax uses); returns their sum.
template <typename scalar_t>
scalar_t exp_shifted(scalar_t* row, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const Vec top(*std::max_element(row, row + n));
  Vec total(0);
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - j);
    const Vec e = (Vec::loadu(row + j, count) - top).exp();
    e.store(row + j, count);
    total = total + Vec::set(Vec(0), e, count);  // tail lanes: 0
  }
  return at::vec::vec_reduce_all<scalar_t>([](Vec& a, Vec& b) { return a + b; }, total);
}

// softmax(scale * q k^T + bias) v for every head of one window: probs (heads, T, T), o (T, heads * v);
// scratch: room for qk * T + T values.
template <typename scalar_t, typename W>
void attend(const Geometry& g, const W& wd, const scalar_t* tokens, const scalar_t* table, const int64_t* index,
            double scale, scalar_t* probs, scalar_t* o, scalar_t* scratch) {
  const int64_t span = g.span(), width = wd.width(), hv = wd.hv(), qk = wd.qk(), v = wd.v();
  const int64_t heads = wd.heads(), length = g.length;
  const scalar_t s = static_cast<scalar_t>(scale);
  std::fill(o, o + span * hv, scalar_t(0));
  scalar_t* keys = scratch;  // (qk, T)
  for (int64_t h = 0; h < heads; ++h) {
    transpose(tokens, span, width, heads * qk + h * qk, qk, keys);
    for (int64_t i = 0; i < span; ++i) {
      const scalar_t* q = tokens + i * width + h * qk;
      scalar_t* row = probs + (h * span + i) * span;
      const int64_t* positions = index + (i % length) * length;
      for (int64_t m = 0; m < g.groups; ++m)
        for (int64_t l = 0; l < length; ++l) row[m * length + l] = table[positions[l] * heads + h];
      for (int64_t c = 0; c < qk; ++c) {
        const scalar_t factor = s * q[c];
        const scalar_t* key = keys + c * span;
        axpy(span, factor, key, row);
      }
      const scalar_t inverse = scalar_t(1) / exp_shifted(row, span);
      scalar_t* out = o + i * hv + h * v;
      for (int64_t j = 0; j < span; ++j) {
        row[j] *= inverse;
        const scalar_t* value = tokens + j * width + 2 * heads * qk + h * v;
        axpy(v, row[j], value, out);
      }
    }
  }
}

// out[voxels of window w, scale's channels] = resize @ o, group by group (a copy where the scale is not pooled).
template <typename scalar_t, typename W>
void place(const Geometry& g, const W& wd, const Place& p, const scalar_t* o, const scalar_t* resize, scalar_t* out) {
  const int64_t hv = wd.hv(), voxels = p.window[0] * p.window[1] * p.window[2], length = g.length;
  for_each_voxel(g, p, [&](int64_t m, int64_t r, int64_t voxel) {
    scalar_t* dst = out + voxel * g.out_channels() + p.scale * hv;
    const scalar_t* src = o + m * length * hv;
    if (voxels == length) {  // not pooled
      std::copy(src + r * hv, src + (r + 1) * hv, dst);
      return;
    }
    const scalar_t* weights = resize + r * length;
    std::fill(dst, dst + hv, scalar_t(0));
    for (int64_t l = 0; l < length; ++l)
      if (weights[l] != 0) axpy(hv, weights[l], src + l * hv, dst);  // trilinear: 8 of the L tokens at most
  });
}

// The scratch one window needs in the forward and in the backward.
int64_t scratch_size(const Geometry& g) { return 2 * g.span() * (g.width() + g.heads * g.v) + g.span() * g.span(); }

template <typename scalar_t, typename W>
void forward_windows(const Geometry& g, const W& wd, const at::Tensor& projected, const at::Tensor& table,
                     const at::Tensor& index, const std::vector<at::Tensor>& resize, double scale, at::Tensor& out,
                     at::Tensor& tokens, at::Tensor& argmax, at::Tensor& probs) {
  const int64_t span = g.span(), width = g.width(), heads = g.heads;
  at::parallel_for(0, g.windows(), 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> scratch(scratch_size(g));
    scalar_t* o = scratch.data() + span * width;
    for (int64_t w = begin; w < end; ++w) {
      const Place p = locate(g, w);
      scalar_t* tok = tokens.data_ptr<scalar_t>() + w * span * width;
      gather(g, wd, p, projected.data_ptr<scalar_t>(), tok, argmax.data_ptr<int32_t>() + w * span * width);
      attend(g, wd, tok, table.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), scale,
             probs.data_ptr<scalar_t>() + w * heads * span * span, o, scratch.data());
      place(g, wd, p, o, resize[p.scale].data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
    }
  });
}

// projected (M, B, D, H, W, C) -> (out (M, B, D, H, W, S*heads*v), tokens (N, T, width), argmax (N, T, width)
// int32, probs (N, heads, T, T)): what pwa_train_backward needs besides the output's gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pwa_train(
    const at::Tensor& projected, const at::Tensor& table, const at::Tensor& index, std::vector<at::Tensor> resize,
    at::IntArrayRef windows, at::IntArrayRef pools, int64_t heads, int64_t qk, int64_t v, double scale) {
  TORCH_CHECK(projected.is_contiguous() && table.scalar_type() == projected.scalar_type(),
              "pwa_train: projected must be contiguous and of the table's dtype");
  TORCH_CHECK(projected.numel() / std::max<int64_t>(projected.size(-1), 1) < std::numeric_limits<int32_t>::max(),
              "pwa_train: too many voxels for int32 indices");
  const Geometry g = make_geometry(projected.sizes(), table, index, windows, pools, heads, qk, v);
  check_resize(g, resize, projected.scalar_type());
  const int64_t n = g.windows(), span = g.span(), width = g.width();
  at::Tensor out = at::empty(g.out_sizes(), projected.options());
  at::Tensor tokens = at::empty({n, span, width}, projected.options());
  at::Tensor argmax = at::empty({n, span, width}, projected.options().dtype(at::kInt));
  at::Tensor probs = at::empty({n, heads, span, span}, projected.options());
  AT_DISPATCH_FLOATING_TYPES(projected.scalar_type(), "pwa_train", [&] {
    dispatch_widths(g, [&](auto wd) {
      forward_windows<scalar_t>(g, wd, projected, table, index, resize, scale, out, tokens, argmax, probs);
    });
  });
  return {out, tokens, argmax, probs};
}

// d_o (T, heads * v) of window w: resize^T @ grad (a copy where the scale is not pooled).
template <typename scalar_t, typename W>
void collect(const Geometry& g, const W& wd, const Place& p, const scalar_t* grad, const scalar_t* resize,
             scalar_t* d_o) {
  const int64_t hv = wd.hv(), voxels = p.window[0] * p.window[1] * p.window[2], length = g.length;
  std::fill(d_o, d_o + g.span() * hv, scalar_t(0));
  for_each_voxel(g, p, [&](int64_t m, int64_t r, int64_t voxel) {
    const scalar_t* src = grad + voxel * g.out_channels() + p.scale * hv;
    scalar_t* dst = d_o + m * length * hv;
    if (voxels == length) {  // not pooled
      std::copy(src, src + hv, dst + r * hv);
      return;
    }
    const scalar_t* weights = resize + r * length;
    for (int64_t l = 0; l < length; ++l)
      if (weights[l] != 0) axpy(hv, weights[l], src, dst + l * hv);
  });
}

// The attention's backward in one window: d_tokens (T, width) from d_o, probs; d_scores (heads, T, T);
// scratch: room for v * T values.
template <typename scalar_t, typename W>
void attend_backward(const Geometry& g, const W& wd, const scalar_t* tokens, const scalar_t* probs,
                     const scalar_t* d_o, double scale, scalar_t* d_tokens, scalar_t* d_scores, scalar_t* scratch) {
  const int64_t span = g.span(), width = wd.width(), hv = wd.hv(), qk = wd.qk(), v = wd.v(), heads = wd.heads();
  const int64_t k0 = heads * qk, v0 = 2 * k0;
  const scalar_t s = static_cast<scalar_t>(scale);
  std::fill(d_tokens, d_tokens + span * width, scalar_t(0));
  scalar_t* values = scratch;  // (v, T)
  for (int64_t h = 0; h < heads; ++h) {
    transpose(tokens, span, width, v0 + h * v, v, values);
    for (int64_t i = 0; i < span; ++i) {
      const scalar_t* row = probs + (h * span + i) * span;
      const scalar_t* grad = d_o + i * hv + h * v;
      scalar_t* d_row = d_scores + (h * span + i) * span;
      std::fill(d_row, d_row + span, scalar_t(0));
      for (int64_t c = 0; c < v; ++c)
        axpy(span, grad[c], values + c * span, d_row);
      scalar_t weighted = 0;
      for (int64_t j = 0; j < span; ++j) weighted += row[j] * d_row[j];
      const scalar_t* q = tokens + i * width + h * qk;
      scalar_t* d_q = d_tokens + i * width + h * qk;
      for (int64_t j = 0; j < span; ++j) {
        scalar_t* d_value = d_tokens + j * width + v0 + h * v;
        axpy(v, row[j], grad, d_value);
        d_row[j] = row[j] * (d_row[j] - weighted);
        const scalar_t* k = tokens + j * width + k0 + h * qk;
        scalar_t* d_k = d_tokens + j * width + k0 + h * qk;
        const scalar_t ds = s * d_row[j];
        axpy(qk, ds, k, d_q);
        axpy(qk, ds, q, d_k);
      }
    }
  }
}

// The table's gradient: d_scores (N, heads, T, T) summed over windows, then over the token pairs that share
// a relative position.
template <typename scalar_t>
void table_gradient(const Geometry& g, const scalar_t* d_scores, const int64_t* index, scalar_t* d_table) {
  const int64_t span = g.span(), block = g.heads * span * span;
  std::vector<scalar_t> sum(d_scores, d_scores + block);
  for (int64_t w = 1; w < g.windows(); ++w)
    axpy(block, scalar_t(1), d_scores + w * block, sum.data());
  for (int64_t h = 0; h < g.heads; ++h)
    for (int64_t i = 0; i < span; ++i)
      for (int64_t j = 0; j < span; ++j)
        d_table[index[(i % g.length) * g.length + j % g.length] * g.heads + h] += sum[(h * span + i) * span + j];
}

// d_projected at the voxels the tokens were pooled from: every (token, column) from its own voxel and channel,
// so plain stores, no conflicts between windows.
template <typename scalar_t, typename W>
void scatter(const Geometry& g, const W& wd, const Place& p, const scalar_t* d_tokens, const int32_t* argmax,
             scalar_t* d_projected) {
  const int64_t width = wd.width();
  for (int64_t t = 0; t < g.span(); ++t)
    for_each_run(g, wd, p.scale, [&](int64_t column, int64_t channel, int64_t length) {
      for (int64_t c = 0; c < length; ++c) {
        const int64_t e = t * width + column + c;
        d_projected[static_cast<int64_t>(argmax[e]) * g.channels + channel + c] = d_tokens[e];
      }
    });
}

template <typename scalar_t, typename W>
void backward_windows(const Geometry& g, const W& wd, const at::Tensor& grad, const at::Tensor& tokens,
                      const at::Tensor& argmax, const at::Tensor& probs, const std::vector<at::Tensor>& resize,
                      double scale, at::Tensor& d_projected, at::Tensor& d_scores) {
  const int64_t span = g.span(), width = g.width(), heads = g.heads;
  at::parallel_for(0, g.windows(), 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> scratch(scratch_size(g));
    scalar_t *d_o = scratch.data(), *d_tok = d_o + span * heads * g.v, *rest = d_tok + span * width;
    for (int64_t w = begin; w < end; ++w) {
      const Place p = locate(g, w);
      collect(g, wd, p, grad.data_ptr<scalar_t>(), resize[p.scale].data_ptr<scalar_t>(), d_o);
      attend_backward(g, wd, tokens.data_ptr<scalar_t>() + w * span * width,
                      probs.data_ptr<scalar_t>() + w * heads * span * span, d_o, scale, d_tok,
                      d_scores.data_ptr<scalar_t>() + w * heads * span * span, rest);
      scatter(g, wd, p, d_tok, argmax.data_ptr<int32_t>() + w * span * width, d_projected.data_ptr<scalar_t>());
    }
  });
}

// The gradients of pwa_train in projected (M, B, D, H, W, C) and in the table (R, heads).
std::tuple<at::Tensor, at::Tensor> pwa_train_backward(
    const at::Tensor& grad, const at::Tensor& tokens, const at::Tensor& argmax, const at::Tensor& probs,
    const at::Tensor& table, const at::Tensor& index, std::vector<at::Tensor> resize, at::IntArrayRef windows,
    at::IntArrayRef pools, int64_t heads, int64_t qk, int64_t v, double scale, at::IntArrayRef projected_sizes) {
  const Geometry g = make_geometry(projected_sizes, table, index, windows, pools, heads, qk, v);
  check_resize(g, resize, tokens.scalar_type());
  const int64_t n = g.windows(), span = g.span(), width = g.width();
  TORCH_CHECK(grad.is_contiguous() && grad.scalar_type() == tokens.scalar_type() &&
                  grad.sizes() == at::IntArrayRef(g.out_sizes()),
              "pwa_train_backward: grad must be contiguous, of the output's shape and dtype");
  TORCH_CHECK(tokens.sizes() == at::IntArrayRef({n, span, width}) && argmax.sizes() == tokens.sizes() &&
                  probs.sizes() == at::IntArrayRef({n, heads, span, span}) && tokens.is_contiguous() &&
                  argmax.is_contiguous() && probs.is_contiguous() && argmax.scalar_type() == at::kInt,
              "pwa_train_backward: tokens, argmax, probs as pwa_train returns them");
  at::Tensor d_projected = at::zeros(projected_sizes, tokens.options());
  at::Tensor d_table = at::zeros_like(table);
  at::Tensor d_scores = at::empty_like(probs);
  AT_DISPATCH_FLOATING_TYPES(tokens.scalar_type(), "pwa_train_backward", [&] {
    dispatch_widths(g, [&](auto wd) {
      backward_windows<scalar_t>(g, wd, grad, tokens, argmax, probs, resize, scale, d_projected, d_scores);
    });
    table_gradient(g, d_scores.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), d_table.data_ptr<scalar_t>());
  });
  return {d_projected, d_table};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(veloxseg, m) {
  m.def(
      "pwa_train(Tensor projected, Tensor table, Tensor index, Tensor[] resize, int[] windows, int[] pools, "
      "int heads, int qk_width, int v_width, float scale) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "pwa_train_backward(Tensor grad, Tensor tokens, Tensor argmax, Tensor probs, Tensor table, Tensor index, "
      "Tensor[] resize, int[] windows, int[] pools, int heads, int qk_width, int v_width, float scale, "
      "int[] projected_sizes) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(veloxseg, CPU, m) {
  m.impl("pwa_train", &pwa_train);
  m.impl("pwa_train_backward", &pwa_train_backward);
}
