// Small-M fp32 matmul for XLA:CPU, as an XLA FFI custom call: out[M, N] = x[M, K] @ w[K, N]
// (`SmallMatmul`; `SmallMatmulBf16` reads bf16 weights, widened exactly, fp32 products and sums).
// Below it, `SmallAttention`: one layer's attention for a few new tokens against the KV cache.
//
// Why: a decode step multiplies 1 to ~16 rows by every weight matrix of the model. For those
// shapes the work is bound by streaming the weights from memory, but XLA:CPU's dot for 2-16 rows
// ran about 2x slower than one weight pass (README, Benchmarks). This kernel streams each weight
// once per call, whatever the number of rows, from a pre-packed layout.
//
// Layout: the weight is packed as [N / NR, K, NR] (NR = 32 columns per panel, contiguous over k),
// so a panel is one sequential read. Each panel is multiplied into register tiles of up to MR
// rows; panels are shared out over XLA's intra-op thread pool.
//
// Determinism: every output element is the sum over k in increasing order, one fused
// multiply-add per k, in the same instruction sequence whatever the row tile, the number of rows
// or the thread count. So a row's result is bit-identical whether it is multiplied alone or with
// other rows (a one-token decode step and a tree verification agree exactly).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t NR = 32;  // columns per packed panel
// Software prefetch: each k step of a panel prefetches the same rows of the next panel into L2,
// one panel (K * 128 bytes) ahead. The hardware prefetcher alone left a 9-row product of
// SmolLM2's 113 MB head waiting on memory (8.2 ms; 3.8-4.6 ms with this, 5.3-5.9 ms prefetching
// 32 steps ahead into L1; 2-core Xeon, ad-hoc harness).

// QMR: rows whose quantized products expand the weights in registers (`qtile`), QPARTS column
// parts of a panel at a time for more than one row: a tile holds the rows' sums and the block's
// scales and offsets, so with AVX2's 16 registers a whole panel spilled at 2 and 3 rows
// (SmolLM2's 113 MB head, 3 rows: 3.5 ms, against 1.2 ms for one). A SmolLM2 forward of 3 rows
// took 21-23 ms with QMR 2 against 28 with QMR 3 (Zen 3; one row 11-12 ms).
#if defined(__AVX512F__)
constexpr int VW = 16;
constexpr int MR = 12;
constexpr int QMR = 4;
constexpr int QPARTS = 1;
#elif defined(__AVX2__) || defined(__AVX__)
constexpr int VW = 8;
constexpr int MR = 3;
constexpr int QMR = 2;
constexpr int QPARTS = 2;
#else
constexpr int VW = 4;
constexpr int MR = 2;
constexpr int QMR = 2;
constexpr int QPARTS = 4;
#endif
constexpr int NV = NR / VW;  // vectors per panel row

typedef float vec __attribute__((vector_size(VW * sizeof(float))));

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(vec));
  return v;
}

inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof(vec)); }

// A panel row's NR weights as NV vectors: fp32 as stored, bf16 (the top half of an fp32) widened
// exactly.
inline void load_row(const float* p, vec* w) {
  for (int v = 0; v < NV; ++v) w[v] = load(p + v * VW);
}

inline void load_row(const uint16_t* p, vec* w) {
  typedef uint16_t hvec __attribute__((vector_size(VW * sizeof(uint16_t))));
  typedef uint32_t uvec __attribute__((vector_size(VW * sizeof(uint32_t))));
  for (int v = 0; v < NV; ++v) {
    hvec h;
    std::memcpy(&h, p + v * VW, sizeof(hvec));
    uvec u = __builtin_convertvector(h, uvec) << 16;
    std::memcpy(&w[v], &u, sizeof(vec));
  }
}

// R rows (x, stride ldx) times kc panel rows (w, NR weights each, contiguous) into out (stride
// N): written when `first`, else added to the partial sums out holds (earlier chunks of k,
// continued in the same order, so a sum split over chunks has the bits of one over all of k).
// `ahead` > 0 prefetches the weights that many past each row (the next panel's same row) into L2.
template <int R, typename Wt>
void tile(const float* __restrict x, int64_t ldx, const Wt* __restrict w, int64_t kc,
          float* __restrict out, int64_t N, bool first, int64_t ahead) {
  constexpr int LINE = 64 / sizeof(Wt);  // weights per cache line
  vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = first ? vec{} : load(out + r * N + v * VW);
  for (int64_t k = 0; k < kc; ++k) {
    if (ahead)
      for (int l = 0; l < NR; l += LINE) __builtin_prefetch(w + k * NR + ahead + l, 0, 2);
    vec wr[NV];
    load_row(w + k * NR, wr);
    for (int r = 0; r < R; ++r) {
      vec b = vec{} + x[r * ldx + k];
      for (int v = 0; v < NV; ++v) acc[r][v] = acc[r][v] + b * wr[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) store(out + r * N + v * VW, acc[r][v]);
}

template <int R, typename Wt>
void tile_dispatch(int rows, const float* x, int64_t ldx, const Wt* w, int64_t kc, float* out,
                   int64_t N, bool first, int64_t ahead) {
  if constexpr (R > 0) {
    if (rows == R) return tile<R>(x, ldx, w, kc, out, N, first, ahead);
    return tile_dispatch<R - 1>(rows, x, ldx, w, kc, out, N, first, ahead);
  }
}

// Panels [p0, p1) for all M rows.
template <typename Wt>
void panels(const float* x, const Wt* w, float* out, int64_t M, int64_t K, int64_t N,
            int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const Wt* panel = w + p * K * NR;
    for (int64_t r = 0; r < M; r += MR) {
      int rows = static_cast<int>(std::min<int64_t>(MR, M - r));
      tile_dispatch<MR>(rows, x + r * K, K, panel, K, out + r * N + p * NR, N, true, K * NR);
    }
  }
}

// Items [0, count) shared out over threads: each claims the next until none is left. It lives in
// a call's shared state (a shared_ptr each helper holds), so a helper that starts after every
// item was claimed touches only memory it keeps alive.
struct Claims {
  int64_t count = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  template <typename F>
  void run(F&& item) {
    for (;;) {
      int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= count) return;
      item(i);
      done.fetch_add(1, std::memory_order_release);
    }
  }

  // Until every item has run (helpers may still be running the last ones claimed).
  void wait() const {
    while (done.load(std::memory_order_acquire) < count) std::this_thread::yield();
  }
};

template <typename Wt>
struct Work {
  const float* x;
  const Wt* w;
  float* out;
  int64_t M, K, N, num_panels, chunk;
  Claims chunks;

  void run() {
    chunks.run([this](int64_t c) {
      int64_t p0 = c * chunk, p1 = std::min(num_panels, p0 + chunk);
      panels(x, w, out, M, K, N, p0, p1);
    });
  }
};

// Runs `work` (a Work or QWork: its panels in chunks, `run()` claiming them) on this thread and
// the pool's helpers.
template <class W>
ffi::Error run_panels(ffi::ThreadPool& pool, std::shared_ptr<W> work) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t P = work->num_panels;
  // Several chunks per thread, so a slow or late helper leaves little for the others to wait on.
  work->chunk = std::max<int64_t>(1, P / (threads * 4));
  work->chunks.count = (P + work->chunk - 1) / work->chunk;
  const int64_t helpers = std::min(threads, work->chunks.count) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->run(); });
  work->run();
  // Chunks claimed by helpers may still be running; a helper that starts after all chunks were
  // claimed touches nothing but `work`, which it keeps alive.
  work->chunks.wait();
  return ffi::Error::Success();
}

template <ffi::DataType WT, typename Wt>
ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<WT> w,
                      ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() < 1 || wd.size() < 3)
    return ffi::Error::InvalidArgument("small_matmul: x needs >= 1 dims, w >= 3 ([N/32, K, 32])");
  const int64_t K = xd.back();
  const int64_t P = wd[wd.size() - 3];
  if (wd[wd.size() - 2] != K || wd.back() != NR)
    return ffi::Error::InvalidArgument("small_matmul: w must be packed [N/32, K, 32] for x's K");
  int64_t lead = 1;
  for (size_t i = 0; i + 3 < wd.size(); ++i) lead *= wd[i];
  if (lead != 1)
    return ffi::Error::InvalidArgument("small_matmul: one weight per call (leading dims of w)");
  const int64_t M = static_cast<int64_t>(x.element_count()) / std::max<int64_t>(K, 1);
  const int64_t N = P * NR;
  if (static_cast<int64_t>(out->element_count()) != M * N)
    return ffi::Error::InvalidArgument("small_matmul: result must be [..., N]");
  if (M == 0 || N == 0) return ffi::Error::Success();

  auto work = std::make_shared<Work<Wt>>();
  work->x = x.typed_data();
  work->w = reinterpret_cast<const Wt*>(w.typed_data());
  work->out = out->typed_data();
  work->M = M;
  work->K = K;
  work->N = N;
  work->num_panels = P;
  return run_panels(pool, work);
}


ffi::Error SmallMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> out) {
  return MatmulImpl<ffi::F32, float>(pool, x, w, out);
}

// The same with bf16 weights (widened exactly to fp32 as they are read; fp32 products and sums).
ffi::Error SmallMatmulBf16Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::F32> out) {
  return MatmulImpl<ffi::BF16, uint16_t>(pool, x, w, out);
}

// ---------------------------------------------------------------------------------------------
// Quantized weights, read in GGUF's blocks and expanded in registers: out = x @ w for the 4-bit
// formats (Q4_0, Q4_1: `SmallMatmulQ4`) and Q8_0 (`SmallMatmulQ8`), fp32 activations and sums.
//
// Layout (`pipeline.kernels.QuantWeight`): the same panels of NR columns as above. q is
// [P, K, 16] bytes for 4 bits (byte c of panel row k holds column c in its low nibble and column
// c + 16 in its high one) or [P, K, 32] int8 for 8 bits; scale and offset are [P, K / 32, NR]
// fp32, one per column per block of QK rows of k (GGUF's block of 32 along a weight's input).
//
// A weight is q * scale + offset (4 bits; Q4_0's offset is -8 * scale) or q * scale (8 bits).
// q * scale is exact in fp32 (a scale read from fp16 has 11 significant bits, q at most 8), so the
// one rounding of the sum, fused or not, gives the fp32 weight gguf's dequantization gives, and
// the products below run the fp32 kernel's fused multiply-adds in its order: a quantized weight's
// result is bit-for-bit the fp32 kernel's on its dequantized copy, for any number of rows.

constexpr int64_t QK = 32;  // k per quantization block

typedef int32_t ivec __attribute__((vector_size(VW * sizeof(int32_t))));

// VW bytes widened to VW int32 lanes, zero- or sign-extended. GCC 12 builds
// __builtin_convertvector from bytes one lane at a time (a load and an insert each), several
// times slower than the one widening load x86 has.
template <bool SIGNED>
inline ivec widen(const void* p) {
  ivec out;
#if defined(__AVX512F__)
  __m512i v = SIGNED ? _mm512_cvtepi8_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)))
                     : _mm512_cvtepu8_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
  std::memcpy(&out, &v, sizeof(ivec));
#elif defined(__AVX2__)
  __m256i v = SIGNED ? _mm256_cvtepi8_epi32(_mm_loadl_epi64(static_cast<const __m128i*>(p)))
                     : _mm256_cvtepu8_epi32(_mm_loadl_epi64(static_cast<const __m128i*>(p)));
  std::memcpy(&out, &v, sizeof(ivec));
#else
  typedef std::conditional_t<SIGNED, int8_t, uint8_t> byte;
  typedef byte bvec __attribute__((vector_size(VW)));
  bvec b;
  std::memcpy(&b, p, sizeof(bvec));
  out = __builtin_convertvector(b, ivec);
#endif
  return out;
}

// 4-bit weights with a scale and an offset per block.
struct Q4 {
  static constexpr int64_t QB = 16;  // bytes per panel row
  const uint8_t* q;
  const float* scale;
  const float* offset;
  int64_t K;

  const uint8_t* row_ptr(int64_t p, int64_t k) const { return q + (p * K + k) * QB; }
  const float* block_ptr(const float* a, int64_t p, int64_t b) const {
    return a + (p * (K / QK) + b) * NR;
  }
  // Vectors [V0, V0 + VN) of the panel's columns (d, m, w hold VN).
  template <int V0, int VN>
  void block(int64_t p, int64_t b, vec* d, vec* m) const {
    const float* s = block_ptr(scale, p, b);
    const float* o = block_ptr(offset, p, b);
    for (int v = 0; v < VN; ++v) d[v] = load(s + (V0 + v) * VW), m[v] = load(o + (V0 + v) * VW);
  }
  void prefetch_block(int64_t p, int64_t b) const {
    for (int l = 0; l < NR; l += 16) {
      __builtin_prefetch(block_ptr(scale, p, b) + l, 0, 2);
      __builtin_prefetch(block_ptr(offset, p, b) + l, 0, 2);
    }
  }
  template <int V0, int VN>
  void row(int64_t p, int64_t k, const vec* d, const vec* m, vec* w) const {
    const uint8_t* r = row_ptr(p, k);
    for (int v = 0; v < VN; ++v) {
      const int c = (V0 + v) * VW;  // the vector's first column
      ivec i = widen<false>(r + c % QB);
      i = c >= QB ? i >> 4 : i & 15;
      w[v] = __builtin_convertvector(i, vec) * d[v] + m[v];
    }
  }
};

// 8-bit weights (int8) with a scale per block.
struct Q8 {
  static constexpr int64_t QB = 32;
  const int8_t* q;
  const float* scale;
  int64_t K;

  const int8_t* row_ptr(int64_t p, int64_t k) const { return q + (p * K + k) * QB; }
  const float* block_ptr(int64_t p, int64_t b) const { return scale + (p * (K / QK) + b) * NR; }
  template <int V0, int VN>
  void block(int64_t p, int64_t b, vec* d, vec*) const {
    for (int v = 0; v < VN; ++v) d[v] = load(block_ptr(p, b) + (V0 + v) * VW);
  }
  void prefetch_block(int64_t p, int64_t b) const {
    for (int l = 0; l < NR; l += 16) __builtin_prefetch(block_ptr(p, b) + l, 0, 2);
  }
  template <int V0, int VN>
  void row(int64_t p, int64_t k, const vec* d, const vec*, vec* w) const {
    const int8_t* r = row_ptr(p, k);
    for (int v = 0; v < VN; ++v) {
      w[v] = __builtin_convertvector(widen<true>(r + (V0 + v) * VW), vec) * d[v];
    }
  }
};

// R rows (x, stride K) times vectors [V0, V0 + VN) of panel p, expanded in registers, into out
// (stride N). The next panel's bytes are prefetched as this one's are read (as `tile` does).
template <int R, int V0, int VN, class S>
void qtile_part(const float* __restrict x, const S& s, int64_t p, float* __restrict out,
                int64_t N) {
  const int64_t K = s.K;
  constexpr int64_t ROWS_PER_LINE = 64 / S::QB;
  vec acc[R][VN];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < VN; ++v) acc[r][v] = vec{};
  for (int64_t b = 0; b < K / QK; ++b) {
    vec d[VN], m[VN];
    s.template block<V0, VN>(p, b, d, m);
    if (V0 == 0) s.prefetch_block(p + 1, b);
    for (int64_t k = b * QK; k < (b + 1) * QK; ++k) {
      if (V0 == 0 && k % ROWS_PER_LINE == 0) __builtin_prefetch(s.row_ptr(p + 1, k), 0, 2);
      vec w[VN];
      s.template row<V0, VN>(p, k, d, m, w);
      for (int r = 0; r < R; ++r) {
        vec bv = vec{} + x[r * K + k];
        for (int v = 0; v < VN; ++v) acc[r][v] = acc[r][v] + bv * w[v];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < VN; ++v) store(out + r * N + (V0 + v) * VW, acc[r][v]);
}

// The panel in QPARTS parts of its columns, so that a part's sums, scales, offsets and weights
// fit the registers (AVX2's 16: two of four vectors for up to 3 rows).
template <int R, class S, int PART = 0>
void qtile(const float* x, const S& s, int64_t p, float* out, int64_t N) {
  constexpr int parts = R == 1 ? 1 : QPARTS;  // one row: the whole panel (one pass is faster)
  if constexpr (PART < parts) {
    constexpr int VN = NV / parts;
    qtile_part<R, PART * VN, VN>(x, s, p, out, N);
    qtile<R, S, PART + 1>(x, s, p, out, N);
  }
}

template <int R, class S>
void qtile_dispatch(int rows, const float* x, const S& s, int64_t p, float* out, int64_t N) {
  if constexpr (R > 0) {
    if (rows == R) return qtile<R, S>(x, s, p, out, N);
    return qtile_dispatch<R - 1>(rows, x, s, p, out, N);
  }
}

// Panel p for M rows: one register tile expands the weights in registers; more rows expand a
// chunk of KC panel rows once into an L1-sized buffer that every row tile then reads.
template <class S>
void qpanel(const float* x, int64_t M, const S& s, int64_t p, float* out, int64_t N) {
  if (M <= QMR) return qtile_dispatch<QMR>(static_cast<int>(M), x, s, p, out, N);
  constexpr int64_t KC = 4 * QK;
  alignas(64) float buf[KC * NR];
  const int64_t K = s.K;
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = std::min(KC, K - k0);
    for (int64_t b = k0 / QK; b < (k0 + kc) / QK; ++b) {
      vec d[NV], m[NV];
      s.template block<0, NV>(p, b, d, m);
      for (int64_t k = b * QK; k < (b + 1) * QK; ++k) {
        vec w[NV];
        s.template row<0, NV>(p, k, d, m, w);
        for (int v = 0; v < NV; ++v) store(buf + (k - k0) * NR + v * VW, w[v]);
      }
    }
    for (int64_t r = 0; r < M; r += MR) {
      int rows = static_cast<int>(std::min<int64_t>(MR, M - r));
      tile_dispatch<MR>(rows, x + r * K + k0, K, buf, kc, out + r * N, N, k0 == 0, 0);
    }
  }
}

template <class S>
struct QWork {
  const float* x;
  S s;
  float* out;
  int64_t M, N, num_panels, chunk;
  Claims chunks;

  void run() {
    chunks.run([this](int64_t c) {
      int64_t p0 = c * chunk, p1 = std::min(num_panels, p0 + chunk);
      for (int64_t p = p0; p < p1; ++p) qpanel(x, M, s, p, out + p * NR, N);
    });
  }
};

// Checks q [P, K, QB] and each of `blocks` [P, K / QK, NR] against x's K, and sets M and P.
// The last three dims of `d`, and whether those before them multiply to 1 (under vmap, a weight
// shared by all rows arrives with leading dims of size 1).
template <typename Dims>
bool last3(const Dims& d, int64_t out[3]) {
  if (d.size() < 3) return false;
  int64_t lead = 1;
  for (size_t i = 0; i + 3 < d.size(); ++i) lead *= d[i];
  for (int i = 0; i < 3; ++i) out[i] = d[d.size() - 3 + i];
  return lead == 1;
}

template <typename Q>
ffi::Error quant_shapes(const ffi::Buffer<ffi::F32>& x, const Q& q, int64_t qb,
                        std::initializer_list<const ffi::Buffer<ffi::F32>*> blocks,
                        int64_t out_count, int64_t& M, int64_t& P) {
  auto xd = x.dimensions();
  int64_t qd[3], ad[3];
  if (xd.size() < 1 || !last3(q.dimensions(), qd))
    return ffi::Error::InvalidArgument(
        "small_matmul_quant: x needs >= 1 dims, q 3 ([P, K, QB]; one weight per call)");
  const int64_t K = xd.back();
  P = qd[0];
  if (qd[1] != K || qd[2] != qb || K % QK != 0)
    return ffi::Error::InvalidArgument("small_matmul_quant: q must be [P, K, " +
                                       std::to_string(qb) + "] for x's K, a multiple of 32");
  for (const auto* a : blocks) {
    if (!last3(a->dimensions(), ad) || ad[0] != P || ad[1] != K / QK || ad[2] != NR)
      return ffi::Error::InvalidArgument("small_matmul_quant: scales must be [P, K / 32, 32]");
  }
  M = static_cast<int64_t>(x.element_count()) / std::max<int64_t>(K, 1);
  if (out_count != M * P * NR)
    return ffi::Error::InvalidArgument("small_matmul_quant: result must be [..., N]");
  return ffi::Error::Success();
}

template <class S>
ffi::Error run_quant(ffi::ThreadPool& pool, const float* x, S s, float* out, int64_t M,
                     int64_t P) {
  if (M == 0 || P == 0) return ffi::Error::Success();
  auto work = std::make_shared<QWork<S>>();
  work->x = x;
  work->s = s;
  work->out = out;
  work->M = M;
  work->N = P * NR;
  work->num_panels = P;
  return run_panels(pool, work);
}

ffi::Error SmallMatmulQ4Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::U8> q, ffi::Buffer<ffi::F32> scale,
                             ffi::Buffer<ffi::F32> offset, ffi::ResultBuffer<ffi::F32> out) {
  int64_t M = 0, P = 0;
  ffi::Error error = quant_shapes(x, q, Q4::QB, {&scale, &offset},
                                  static_cast<int64_t>(out->element_count()), M, P);
  if (error.failure()) return error;
  Q4 s{q.typed_data(), scale.typed_data(), offset.typed_data(), x.dimensions().back()};
  return run_quant(pool, x.typed_data(), s, out->typed_data(), M, P);
}

ffi::Error SmallMatmulQ8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::S8> q, ffi::Buffer<ffi::F32> scale,
                             ffi::ResultBuffer<ffi::F32> out) {
  int64_t M = 0, P = 0;
  ffi::Error error = quant_shapes(x, q, Q8::QB, {&scale},
                                  static_cast<int64_t>(out->element_count()), M, P);
  if (error.failure()) return error;
  Q8 s{q.typed_data(), scale.typed_data(), x.dimensions().back()};
  return run_quant(pool, x.typed_data(), s, out->typed_data(), M, P);
}

// ---------------------------------------------------------------------------------------------
// Few-query attention over a KV cache, one call per layer: out = softmax(q k^T, mask) v for T
// new tokens (queries pre-scaled) against S cache slots and the T new tokens themselves.
//
// Shapes (leading dims multiply into B): q [B, T, Hq, hd]; k, v [B, T, Hkv, hd] (the new tokens);
// cache_k [B, Hkv, hd, S]; cache_v [B, Hkv, S, hd]; mask [B, T, S + T] (pred); out [B, T, Hq*hd].
// Query head h*G + g reads key/value head h (G = Hq / Hkv), as in `pipeline.llm.attention`.
//
// Determinism: a query row's result depends only on the keys/values it sees, visited in column
// order (cache slots, then new tokens): each score is one fused multiply-add per feature in
// feature order, the softmax max is exact, masked columns weigh exactly 0, and the denominator
// and the weighted value sums run over columns in order. So a token attends to the same keys with
// the same bits whether they sit in the cache (a one-token step) or among the new tokens (a tree
// verification), and whatever other rows share the call.

inline vec splat(float a) { return vec{} + a; }

inline vec vmax(vec a, vec b) { return a > b ? a : b; }

// exp(x) for x <= 0 (lane-wise, a pure function of each lane): 2^n * p(r), r = x - n ln 2.
// Below about -87.3 (and for -inf) the result is 0.
inline vec vexp(vec x) {
  const vec lo = splat(-87.33f);
  vec xc = vmax(x, lo);
  vec t = xc * splat(1.44269504088896341f) - splat(0.5f);
  ivec n = __builtin_convertvector(t, ivec);  // truncation: round to nearest for t + 0.5 <= 0
  vec nf = __builtin_convertvector(n, vec);
  vec r = xc - nf * splat(0.693359375f);
  r = r - nf * splat(-2.12194440e-4f);
  vec p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  ivec bits = (n + 127) << 23;
  vec scale;
  std::memcpy(&scale, &bits, sizeof(vec));
  vec out = p * scale;
  return x < lo ? vec{} : out;
}

// scores[r][c] for rows [0, R) of qt ([R][hd], this head's queries) against `nv` vectors of
// columns of kt ([hd][ld] floats, column-contiguous): rows RQ at a time and NC column vectors,
// independent accumulators, each one FMA chain over the features in order.
constexpr int64_t RQ = 4;

template <int NC>
void qk_tile(const float* q, int64_t r0, int64_t nr, int64_t hd, const float* kt, int64_t ld,
             float* scores, int64_t sld) {
  vec acc[RQ][NC] = {};
  const float* rows[RQ];
  for (int64_t i = 0; i < RQ; ++i) rows[i] = q + (r0 + (i < nr ? i : 0)) * hd;
  for (int64_t d = 0; d < hd; ++d) {
    vec kv[NC];
    for (int64_t j = 0; j < NC; ++j) kv[j] = load(kt + d * ld + j * VW);
    for (int64_t i = 0; i < RQ; ++i) {
      const vec b = splat(rows[i][d]);
      for (int64_t j = 0; j < NC; ++j) acc[i][j] = acc[i][j] + b * kv[j];
    }
  }
  for (int64_t i = 0; i < nr; ++i)
    for (int64_t j = 0; j < NC; ++j) store(scores + (r0 + i) * sld + j * VW, acc[i][j]);
}

void qk_block(const float* q, int64_t R, int64_t hd, const float* kt, int64_t ld, int64_t nv,
              float* scores, int64_t sld) {
  for (int64_t r0 = 0; r0 < R; r0 += RQ) {
    const int64_t nr = std::min<int64_t>(RQ, R - r0);
    int64_t c = 0;
    for (; c + 3 <= nv; c += 3) qk_tile<3>(q, r0, nr, hd, kt + c * VW, ld, scores + c * VW, sld);
    if (nv - c == 2) qk_tile<2>(q, r0, nr, hd, kt + c * VW, ld, scores + c * VW, sld);
    if (nv - c == 1) qk_tile<1>(q, r0, nr, hd, kt + c * VW, ld, scores + c * VW, sld);
  }
}

struct AttnShapes {
  int64_t B, T, Hq, Hkv, G, hd, S;
};

// Value vectors per head the attention kernel serves: head sizes up to 128 floats in any build
// (head_dim <= MAX_DV * VW).
constexpr int64_t MAX_DV = 128 / VW;

// Weighted sums of the values, RB rows at a time sharing each value row: an FMA chain per output
// over the columns in order (a weight of 0 adds exactly nothing), the denominator the same way.
template <int DV>
void pv_rows(const AttnShapes& a, const float* sc, int64_t sld, int64_t r_lo, int64_t R,
             int64_t cache_end, int64_t cache_pad, const float* cvh, const float* vn, int64_t b,
             int64_t h, float* out) {
  const int64_t G = a.G, T = a.T;
  constexpr int64_t RB = DV <= 4 ? 3 : 1;
  const int64_t hd = DV * VW;
  for (int64_t r0 = 0; r0 < R; r0 += RB) {
    const int64_t nr = std::min<int64_t>(RB, R - r0);
    const float* srow[RB];
    for (int64_t i = 0; i < RB; ++i) srow[i] = sc + (r0 + (i < nr ? i : 0)) * sld;
    vec acc[RB][DV] = {};
    float den[RB] = {};
    auto add = [&](const float* vrow, int64_t c) {
      float p[RB];
      bool any = false;
      for (int64_t i = 0; i < RB; ++i) {
        p[i] = srow[i][c];
        any |= p[i] != 0.0f;
      }
      if (!any) return;
      for (int64_t i = 0; i < RB; ++i) den[i] = den[i] + p[i];
      for (int64_t j = 0; j < DV; ++j) {
        const vec w = load(vrow + j * VW);
        for (int64_t i = 0; i < RB; ++i) acc[i][j] = acc[i][j] + splat(p[i]) * w;
      }
    };
    for (int64_t c = 0; c < cache_end; ++c) add(cvh + c * hd, c);
    for (int64_t u = 0; u < T; ++u) add(vn + ((b * T + u) * a.Hkv + h) * hd, cache_pad + u);
    for (int64_t i = 0; i < nr; ++i) {
      const int64_t r = r_lo + r0 + i, t = r / G, g = r % G;
      float* orow = out + (b * T + t) * a.Hq * hd + (h * G + g) * hd;
      if (den[i] == 0.0f) {  // sees nothing (the model's masks never make such a row): zeros
        std::memset(orow, 0, hd * sizeof(float));
        continue;
      }
      const vec dv = splat(den[i]);
      for (int64_t j = 0; j < DV; ++j) store(orow + j * VW, acc[i][j] / dv);
    }
  }
}

template <int DV>
void pv_dispatch(int64_t dv, const AttnShapes& a, const float* sc, int64_t sld, int64_t r_lo,
                 int64_t R, int64_t cache_end, int64_t cache_pad, const float* cvh,
                 const float* vn, int64_t b, int64_t h, float* out) {
  if constexpr (DV > 0) {
    if (dv == DV) return pv_rows<DV>(a, sc, sld, r_lo, R, cache_end, cache_pad, cvh, vn, b, h, out);
    return pv_dispatch<DV - 1>(dv, a, sc, sld, r_lo, R, cache_end, cache_pad, cvh, vn, b, h, out);
  }
}

// One (batch row, key/value head): query rows [r_lo, r_hi) of its T*G (row t*G + g is token t,
// query head h*G + g).
void attend_head(const AttnShapes& a, const float* q, const float* kn, const float* vn,
                 const float* ck, const float* cv, const bool* mask, float* out, int64_t b,
                 int64_t h, int64_t cache_end, int64_t r_lo, int64_t r_hi) {
  const int64_t T = a.T, G = a.G, hd = a.hd, S = a.S, R = r_hi - r_lo;
  const int64_t cv_full = cache_end / VW;                 // whole vectors of cache columns
  const int64_t cache_pad = (cache_end + VW - 1) / VW * VW;  // cache columns, padded
  const int64_t new_pad = (T + VW - 1) / VW * VW;
  const int64_t sld = cache_pad + new_pad;  // a scores row: cache part, then new part
  thread_local std::vector<float> buf;
  const size_t need = R * hd + R * sld + hd * (VW + new_pad);
  if (buf.size() < need) buf.resize(need);
  float* qt = buf.data();        // [R][hd]
  float* sc = qt + R * hd;       // [R][sld]
  float* kt = sc + R * sld;      // [hd][VW]: the cache's last partial vector of columns
  float* knt = kt + hd * VW;     // [hd][new_pad]: the new keys, transposed
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = (r_lo + r) / G, g = (r_lo + r) % G;
    std::memcpy(qt + r * hd, q + ((b * T + t) * a.Hq + h * G + g) * hd, hd * sizeof(float));
  }
  const float* ckh = ck + (b * a.Hkv + h) * hd * S;   // [hd][S]
  const float* cvh = cv + (b * a.Hkv + h) * S * hd;   // [S][hd]
  // Scores against the cache (whole vectors in place, the tail through a zero-padded copy) and
  // against the new tokens: the same code, so the same bits for the same key.
  qk_block(qt, R, hd, ckh, S, cv_full, sc, sld);
  if (cache_pad > cv_full * VW) {
    const int64_t c0 = cv_full * VW, n = cache_end - c0;
    for (int64_t d = 0; d < hd; ++d) {
      for (int64_t j = 0; j < VW; ++j) kt[d * VW + j] = j < n ? ckh[d * S + c0 + j] : 0.0f;
    }
    qk_block(qt, R, hd, kt, VW, 1, sc + c0, sld);
  }
  for (int64_t d = 0; d < hd; ++d)
    for (int64_t u = 0; u < new_pad; ++u)
      knt[d * new_pad + u] = u < T ? kn[((b * T + u) * a.Hkv + h) * hd + d] : 0.0f;
  qk_block(qt, R, hd, knt, new_pad, new_pad / VW, sc + cache_pad, sld);
  // Masked columns to -inf, then each row's max and exp (masked: exactly 0).
  for (int64_t r = 0; r < R; ++r) {
    const bool* mrow = mask + (b * T + (r_lo + r) / G) * (S + T);
    float* srow = sc + r * sld;
    for (int64_t c = 0; c < cache_end; ++c) srow[c] = mrow[c] ? srow[c] : -INFINITY;
    for (int64_t c = cache_end; c < cache_pad; ++c) srow[c] = -INFINITY;
    for (int64_t u = 0; u < new_pad; ++u)
      srow[cache_pad + u] = u < T && mrow[S + u] ? srow[cache_pad + u] : -INFINITY;
    vec mv = splat(-INFINITY);
    for (int64_t c = 0; c < sld; c += VW) mv = vmax(mv, load(srow + c));
    float m = -INFINITY;
    for (int j = 0; j < VW; ++j) m = std::max(m, mv[j]);
    // A row that sees nothing (the model's masks never make one) gets zeros below.
    const vec ms = splat(m == -INFINITY ? 0.0f : m);
    for (int64_t c = 0; c < sld; c += VW) store(srow + c, vexp(load(srow + c) - ms));
  }
  pv_dispatch<MAX_DV>(hd / VW, a, sc, sld, r_lo, R, cache_end, cache_pad, cvh, vn, b, h, out);
}

struct AttnWork {
  AttnShapes a;
  const float *q, *kn, *vn, *ck, *cv;
  const bool* mask;
  float* out;
  int64_t parts, part_rows;
  std::vector<int64_t> ends;
  Claims items;  // (batch row, kv head, row part)

  void run() {
    items.run([this](int64_t i) {
      const int64_t part = i % parts, bh = i / parts, b = bh / a.Hkv;
      const int64_t lo = part * part_rows, hi = std::min(a.T * a.G, lo + part_rows);
      attend_head(a, q, kn, vn, ck, cv, mask, out, b, bh % a.Hkv, ends[b], lo, hi);
    });
  }
};

ffi::Error SmallAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                              ffi::Buffer<ffi::F32> kn, ffi::Buffer<ffi::F32> vn,
                              ffi::Buffer<ffi::F32> ck, ffi::Buffer<ffi::F32> cv,
                              ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = kn.dimensions(), ckd = ck.dimensions();
  if (qd.size() < 3 || kd.size() < 3 || ckd.size() < 3)
    return ffi::Error::InvalidArgument(
        "small_attention: q, k need [..., T, H, hd], cache [..., hd, S]");
  AttnShapes a;
  a.T = qd[qd.size() - 3];
  a.Hq = qd[qd.size() - 2];
  a.hd = qd.back();
  a.Hkv = kd[kd.size() - 2];
  a.S = ckd.back();
  if (a.T == 0 || a.Hq == 0 || a.Hkv == 0 || a.Hq % a.Hkv != 0)
    return ffi::Error::InvalidArgument(
        "small_attention: query heads must be a multiple of kv heads");
  if (a.hd % VW != 0 || a.hd / VW > MAX_DV)
    return ffi::Error::InvalidArgument(
        "small_attention: head_dim must be a multiple of the vector width, at most 128");
  a.G = a.Hq / a.Hkv;
  a.B = static_cast<int64_t>(q.element_count()) / (a.T * a.Hq * a.hd);
  if (static_cast<int64_t>(kn.element_count()) != a.B * a.T * a.Hkv * a.hd ||
      static_cast<int64_t>(vn.element_count()) != a.B * a.T * a.Hkv * a.hd ||
      ckd[ckd.size() - 2] != a.hd ||
      static_cast<int64_t>(ck.element_count()) != a.B * a.Hkv * a.hd * a.S ||
      static_cast<int64_t>(cv.element_count()) != a.B * a.Hkv * a.S * a.hd ||
      static_cast<int64_t>(mask.element_count()) != a.B * a.T * (a.S + a.T) ||
      static_cast<int64_t>(out->element_count()) != a.B * a.T * a.Hq * a.hd)
    return ffi::Error::InvalidArgument("small_attention: shapes disagree (see small_matmul.cc)");
  const float* qp = q.typed_data();
  const float* knp = kn.typed_data();
  const float* vnp = vn.typed_data();
  const float* ckp = ck.typed_data();
  const float* cvp = cv.typed_data();
  const bool* mp = mask.typed_data();
  float* op = out->typed_data();
  auto work = std::make_shared<AttnWork>();
  work->a = a;
  work->q = q.typed_data();
  work->kn = kn.typed_data();
  work->vn = vn.typed_data();
  work->ck = ck.typed_data();
  work->cv = cv.typed_data();
  work->mask = mask.typed_data();
  work->out = out->typed_data();
  // Per batch row: one past the last cache slot any of its queries sees.
  work->ends.assign(a.B, 0);
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t t = 0; t < a.T; ++t) {
      const bool* mrow = work->mask + (b * a.T + t) * (a.S + a.T);
      for (int64_t c = a.S; c > work->ends[b]; --c)
        if (mrow[c - 1]) {
          work->ends[b] = c;
          break;
        }
    }
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // Rows x columns of scores: below about 8K (one token against a few hundred slots) the call
  // is a few microseconds and helpers would cost more than they save.
  int64_t cells = 0;
  for (int64_t b = 0; b < a.B; ++b) cells += a.Hkv * a.T * a.G * (work->ends[b] + a.T);
  const bool split = threads > 1 && cells >= 8192;
  // With few (batch row, kv head) pairs, each head's rows in up to 4 parts of at least 12 rows,
  // each a multiple of 3 (the value sums' row tile).
  const int64_t R = a.T * a.G;
  const bool few = a.B * a.Hkv < 4 * threads;
  work->parts = split && few ? std::max<int64_t>(1, std::min<int64_t>(4, R / 12)) : 1;
  work->part_rows = (R + work->parts - 1) / work->parts;
  work->part_rows = (work->part_rows + 2) / 3 * 3;
  work->parts = (R + work->part_rows - 1) / work->part_rows;
  work->items.count = a.B * a.Hkv * work->parts;
  const int64_t helpers = split ? std::min(threads, work->items.count) - 1 : 0;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->run(); });
  work->run();
  work->items.wait();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SmallMatmul, SmallMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SmallMatmulBf16, SmallMatmulBf16Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SmallMatmulQ4, SmallMatmulQ4Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SmallMatmulQ8, SmallMatmulQ8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The register tile this build uses, for tests and reports: VW * 1000 + MR.
extern "C" int small_matmul_tile() { return VW * 1000 + MR; }
// Head size the attention kernel serves, in floats (Python's `attention_applies` reads it).
extern "C" int small_attention_max_head_dim() { return MAX_DV * VW; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(SmallAttention, SmallAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
