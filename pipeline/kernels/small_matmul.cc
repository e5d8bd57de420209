// Small-M fp32 matmul for XLA:CPU, as an XLA FFI custom call: out[M, N] = x[M, K] @ w[K, N].
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
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t NR = 32;  // columns per packed panel
// Software prefetch: each k step of a panel prefetches the same rows of the next panel into L2,
// one panel (K * 128 bytes) ahead. The hardware prefetcher alone left a 9-row product of
// SmolLM2's 113 MB head waiting on memory (8.2 ms; 3.8-4.6 ms with this, 5.3-5.9 ms prefetching
// 32 steps ahead into L1; 2-core Xeon, ad-hoc harness).

#if defined(__AVX512F__)
constexpr int VW = 16;
constexpr int MR = 12;
#elif defined(__AVX2__) || defined(__AVX__)
constexpr int VW = 8;
constexpr int MR = 3;
#else
constexpr int VW = 4;
constexpr int MR = 2;
#endif
constexpr int NV = NR / VW;  // vectors per panel row

typedef float vec __attribute__((vector_size(VW * sizeof(float))));

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(vec));
  return v;
}

inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof(vec)); }

// R rows (x, stride K) times one panel (K x NR, contiguous) into out (stride N).
template <int R>
void tile(const float* __restrict x, int64_t K, const float* __restrict panel,
          float* __restrict out, int64_t N) {
  vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vec{};
  for (int64_t k = 0; k < K; ++k) {
    __builtin_prefetch(panel + (K + k) * NR, 0, 2);
    __builtin_prefetch(panel + (K + k) * NR + NR / 2, 0, 2);
    vec w[NV];
    for (int v = 0; v < NV; ++v) w[v] = load(panel + k * NR + v * VW);
    for (int r = 0; r < R; ++r) {
      vec b = vec{} + x[r * K + k];
      for (int v = 0; v < NV; ++v) acc[r][v] = acc[r][v] + b * w[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) store(out + r * N + v * VW, acc[r][v]);
}

template <int R>
void tile_dispatch(int rows, const float* x, int64_t K, const float* panel, float* out,
                   int64_t N) {
  if constexpr (R > 0) {
    if (rows == R) return tile<R>(x, K, panel, out, N);
    return tile_dispatch<R - 1>(rows, x, K, panel, out, N);
  }
}

// Panels [p0, p1) for all M rows.
void panels(const float* x, const float* w, float* out, int64_t M, int64_t K, int64_t N,
            int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* panel = w + p * K * NR;
    for (int64_t r = 0; r < M; r += MR) {
      int rows = static_cast<int>(std::min<int64_t>(MR, M - r));
      tile_dispatch<MR>(rows, x + r * K, K, panel, out + r * N + p * NR, N);
    }
  }
}

struct Work {
  const float* x;
  const float* w;
  float* out;
  int64_t M, K, N, num_panels, chunk, num_chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  // Claims and runs chunks until none is left.
  void run() {
    for (;;) {
      int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= num_chunks) return;
      int64_t p0 = c * chunk, p1 = std::min(num_panels, p0 + chunk);
      panels(x, w, out, M, K, N, p0, p1);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error SmallMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> out) {
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

  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  auto work = std::make_shared<Work>();
  work->x = x.typed_data();
  work->w = w.typed_data();
  work->out = out->typed_data();
  work->M = M;
  work->K = K;
  work->N = N;
  work->num_panels = P;
  // Several chunks per thread, so a slow or late helper leaves little for the others to wait on.
  work->chunk = std::max<int64_t>(1, P / (threads * 4));
  work->num_chunks = (P + work->chunk - 1) / work->chunk;
  const int64_t helpers = std::min(threads, work->num_chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->run(); });
  work->run();
  // Chunks claimed by helpers may still be running; a helper that starts after all chunks were
  // claimed touches nothing but `work`, which it keeps alive.
  while (work->done.load(std::memory_order_acquire) < work->num_chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SmallMatmul, SmallMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The register tile this build uses, for tests and reports: VW * 1000 + MR.
extern "C" int small_matmul_tile() { return VW * 1000 + MR; }
