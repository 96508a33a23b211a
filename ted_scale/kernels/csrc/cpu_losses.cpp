// CPU kernels of the fused LM-head losses (docs/design.md, "Fused losses on CPU"): the per-chunk
// ops of `torch_ops.cross_entropy_`, `kl_div_` and `cross_entropy_kl_div_` for fp32 logits, one
// row at a time in a few sweeps that stay in L2 where torch's ops make ~16 passes per block.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// Sums over a row add fp32 partial sums of this many elements (vectorised) in fp64: one fp32
// accumulator per lane over 50k terms loses ~1e-5 relative.
constexpr int64_t kSumBlock = 1024;

// 2^x for x <= 0 (an argument minus its row max), within 8e-8 relative of the exact value; 0 below
// -126 (exp underflows there in fp32 too). A polynomial so that the loops vectorise: libm's exp
// does not, and torch's vectorised exp is ~3x slower than this on one core.
#pragma omp declare simd notinbranch
inline float exp2_nonpos(float x) {
  const float clamped = x < -126.0f ? -126.0f : x;
  const float n = std::nearbyint(clamped);
  const float f = (clamped - n) * kLn2;  // e^f with |f| <= ln2 / 2: degree 7 is exact in fp32
  float p = 1.0f / 5040.0f;
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return x < -126.0f ? 0.0f : p * scale;
}

// CE targets of one row: k ids with weights (k = 0: no CE).
struct Targets {
  const int64_t* ids;
  const float* weights;
  int64_t k;

  float weight_sum() const {
    float s = 0.0f;
    for (int64_t i = 0; i < k; ++i) s += weights[i];
    return s;
  }
  float weighted_logits(const float* x) const {
    float s = 0.0f;
    for (int64_t i = 0; i < k; ++i) s += weights[i] * x[ids[i]];
    return s;
  }
  void subtract_from(float* x) const {  // - sum_i w_i onehot(t_i): CE's gradient term
    for (int64_t i = 0; i < k; ++i) x[ids[i]] -= weights[i];
  }
};

float row_max(const float* __restrict x, int64_t V) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < V; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// Each row function takes its row as its own __restrict pointers: inside at::parallel_for's
// OpenMP region the loops vectorise only then (4.8x slower otherwise, measured).

// x [V] becomes d/dx of sum_i w_i (lse(x) - x[t_i]), which is returned.
float cross_entropy_row_(float* __restrict x, int64_t V, Targets tg) {
  const float mx = row_max(x, V), target_sum = tg.weighted_logits(x), scale = mx * kLog2e;
  double total = 0.0;
  for (int64_t j0 = 0; j0 < V; j0 += kSumBlock) {
    const int64_t j1 = std::min(j0 + kSumBlock, V);
    float block = 0.0f;
#pragma omp simd reduction(+ : block)
    for (int64_t j = j0; j < j1; ++j) {
      x[j] = exp2_nonpos(x[j] * kLog2e - scale);
      block += x[j];
    }
    total += block;
  }
  const float w = tg.weight_sum(), k = w / static_cast<float>(total);
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) x[j] *= k;
  tg.subtract_from(x);
  return w * (mx + static_cast<float>(std::log(total))) - target_sum;
}

// With a = x / T, b = t / T, e_b = exp(b - max b) (as the Triton kernel):
// KD = row_weight T^2 (sum(e_b (b - a)) / sum(e_b) - lse(b) + lse(a)), plus CE over tg (k > 0).
// x [V] becomes d(CE + kd_weight KD)/dx = kd_weight row_weight T (p_s - p_t) + CE's gradient; t [V]
// is clobbered. At T = 1 and 2 the student's exponentials are kept in x and CE's softmax is them
// (T = 1) or their squares (T = 2): one exp per logit and tensor, three sweeps of the row in all.
void ce_kd_row_(float* __restrict x, float* __restrict t, int64_t V, Targets tg, float row_weight,
                float T, float kd_weight, float* ce_out, float* kd_out) {
  const float inv_t = 1.0f / T, c = kLog2e / T;
  const bool one = T == 1.0f, two = T == 2.0f, cached = one || two, with_ce = tg.k > 0;
  float mx = -INFINITY, mt = -INFINITY;
#pragma omp simd reduction(max : mx, mt)
  for (int64_t j = 0; j < V; ++j) {
    mx = x[j] > mx ? x[j] : mx;
    mt = t[j] > mt ? t[j] : mt;
  }
  const float target_sum = tg.weighted_logits(x), w = tg.weight_sum();
  double sum_s = 0.0, sum_t = 0.0, sum_ce = 0.0, cross = 0.0;
  for (int64_t j0 = 0; j0 < V; j0 += kSumBlock) {
    const int64_t j1 = std::min(j0 + kSumBlock, V);
    float bs = 0.0f, bt = 0.0f, bc = 0.0f, bx = 0.0f;
    if (cached) {
#pragma omp simd reduction(+ : bs, bt, bc, bx)
      for (int64_t j = j0; j < j1; ++j) {
        const float es = exp2_nonpos((x[j] - mx) * c), et = exp2_nonpos((t[j] - mt) * c);
        bs += es;
        bt += et;
        bc += two ? es * es : es;
        bx += et * (t[j] - x[j]);
        t[j] = et;
        x[j] = es;
      }
    } else {
#pragma omp simd reduction(+ : bs, bt, bc, bx)
      for (int64_t j = j0; j < j1; ++j) {
        const float d = x[j] - mx, et = exp2_nonpos((t[j] - mt) * c);
        bs += exp2_nonpos(d * c);
        bt += et;
        bc += with_ce ? exp2_nonpos(d * kLog2e) : 0.0f;
        bx += et * (t[j] - x[j]);
        t[j] = et;
      }
    }
    sum_s += bs;
    sum_t += bt;
    sum_ce += bc;
    cross += bx;
  }
  const float lse_s = mx * inv_t + static_cast<float>(std::log(sum_s));
  const float lse_t = mt * inv_t + static_cast<float>(std::log(sum_t));
  *kd_out = row_weight * T * T *
            (static_cast<float>(cross / sum_t) * inv_t - lse_t + lse_s);
  *ce_out = with_ce ? w * (mx + static_cast<float>(std::log(sum_ce))) - target_sum : 0.0f;
  const float scale = kd_weight * row_weight * T;
  const float ks = scale / static_cast<float>(sum_s), kt = scale / static_cast<float>(sum_t);
  const float kc = with_ce ? w / static_cast<float>(sum_ce) : 0.0f;
  if (cached) {
    const float k1 = one ? ks + kc : ks, k2 = two ? kc : 0.0f;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      const float es = x[j];
      x[j] = (k1 + k2 * es) * es - kt * t[j];
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      const float d = x[j] - mx;
      x[j] = ks * exp2_nonpos(d * c) - kt * t[j] + (with_ce ? kc * exp2_nonpos(d * kLog2e) : 0.0f);
    }
  }
  tg.subtract_from(x);
}

void check_rows(const at::Tensor& logits, const at::Tensor& targets,
                const at::Tensor& weights) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "logits must be contiguous fp32 [n, V], got ", logits.sizes(), " ",
              logits.scalar_type());
  const int64_t n = logits.size(0);
  TORCH_CHECK(targets.dim() == 2 && targets.size(0) == n && targets.is_contiguous() &&
                  targets.scalar_type() == at::kLong,
              "targets must be contiguous int64 [n, k] for ", n, " rows, got ", targets.sizes());
  TORCH_CHECK(weights.sizes() == targets.sizes() && weights.is_contiguous() &&
                  weights.scalar_type() == at::kFloat,
              "CE weights must be contiguous fp32 shaped like targets ", targets.sizes(), ", got ",
              weights.sizes());
}

Targets row_targets(const at::Tensor& targets, const at::Tensor& weights, int64_t r) {
  const int64_t k = targets.size(1);
  return {targets.data_ptr<int64_t>() + r * k, weights.data_ptr<float>() + r * k, k};
}

}  // namespace

// logits [n, V] fp32 become the gradient; targets [n, k] int64 in [0, V), weights [n, k] fp32.
// Returns the CE rows [n] (each sum_i w_i CE(x, t_i)).
at::Tensor cross_entropy_(at::Tensor logits, at::Tensor targets, at::Tensor weights) {
  check_rows(logits, targets, weights);
  const int64_t n = logits.size(0), V = logits.size(1);
  auto loss = at::empty({n}, logits.options());
  float* x = logits.data_ptr<float>();
  float* out = loss.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      out[r] = cross_entropy_row_(x + r * V, V, row_targets(targets, weights, r));
  });
  return loss;
}

// As `ce_kd_row_` per row: logits, teacher [n, V] fp32 (logits become the gradient, teacher is
// clobbered), targets / ce_weights [n, k] (k = 0: KD alone), row_weight [n] fp32 (KD's).
// Returns (ce [n], kd [n]).
std::vector<at::Tensor> cross_entropy_kl_div_(at::Tensor logits, at::Tensor teacher,
                                                 at::Tensor targets, at::Tensor ce_weights,
                                                 at::Tensor row_weight, double temperature,
                                                 double kd_weight) {
  check_rows(logits, targets, ce_weights);
  TORCH_CHECK(teacher.sizes() == logits.sizes() && teacher.is_contiguous() &&
                  teacher.scalar_type() == at::kFloat,
              "teacher logits must be contiguous fp32 shaped like the student's ", logits.sizes(),
              ", got ", teacher.sizes());
  const int64_t n = logits.size(0), V = logits.size(1);
  TORCH_CHECK(row_weight.dim() == 1 && row_weight.size(0) == n && row_weight.is_contiguous() &&
                  row_weight.scalar_type() == at::kFloat,
              "row_weight must be contiguous fp32 [", n, "], got ", row_weight.sizes());
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
  auto ce = at::empty({n}, logits.options());
  auto kd = at::empty({n}, logits.options());
  float* x = logits.data_ptr<float>();
  float* t = teacher.data_ptr<float>();
  const float* rw = row_weight.data_ptr<float>();
  float* ce_out = ce.data_ptr<float>();
  float* kd_out = kd.data_ptr<float>();
  const float T = static_cast<float>(temperature), kdw = static_cast<float>(kd_weight);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      ce_kd_row_(x + r * V, t + r * V, V, row_targets(targets, ce_weights, r), rw[r], T, kdw,
                 ce_out + r, kd_out + r);
  });
  return {ce, kd};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cross_entropy_", &cross_entropy_, "CE rows; logits become their gradient");
  m.def("cross_entropy_kl_div_", &cross_entropy_kl_div_,
        "CE and T^2 KL rows; logits become the gradient of CE + kd_weight KD");
}
