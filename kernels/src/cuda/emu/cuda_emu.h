// Host emulation of the CUDA C subset our kernels use, force-included (g++ -include) before
// each kernels/src/cuda/*.cu file, so the very sources NVRTC compiles for the GPU also run
// on a CPU, in CI, against the CPU backend.
//
// Model: a launch runs its blocks one at a time, so `__shared__` is static storage; the
// threads of a block are user-space fibers (ucontext) switched at `__syncthreads` and warp
// shuffles, which are barriers among the block's (or the warp's) threads. A barrier that
// not every live thread of its scope reaches is reported as a deadlock, never a hang.
// With LIGHTRNN_EMU_THREADS defined, every CUDA thread is an OS thread instead and the
// barriers are mutex + condition variable (what ThreadSanitizer understands), so a missing
// `__syncthreads` shows up as a data race.
//
// Launch ABI: `lightrnn_emu_launch(name, grid, block, params, ...)` with `params` as for
// cuLaunchKernel: an array of pointers to each argument's value.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {
// The running thread's indices (per OS thread; in fiber mode the scheduler sets them
// before it resumes a fiber).
extern thread_local dim3 t_thread;
extern thread_local dim3 t_block;
extern dim3 g_block_dim;
extern dim3 g_grid_dim;
void sync_block();
// Exchange `v` among the 32 lanes of the calling warp: returns lane `src`'s value.
float warp_exchange(float v, unsigned src);
unsigned lane_id();
}  // namespace emu

#define __global__
#define __device__ static
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define threadIdx (::emu::t_thread)
#define blockIdx (::emu::t_block)
#define blockDim (::emu::g_block_dim)
#define gridDim (::emu::g_grid_dim)
#define warpSize 32

inline void __syncthreads() { ::emu::sync_block(); }
inline float __shfl_xor_sync(unsigned, float v, int mask) {
  return ::emu::warp_exchange(v, ::emu::lane_id() ^ unsigned(mask));
}
inline float __shfl_down_sync(unsigned, float v, unsigned d) {
  unsigned l = ::emu::lane_id() + d;
  return ::emu::warp_exchange(v, l < 32 ? l : ::emu::lane_id());
}
inline unsigned __umulhi(unsigned a, unsigned b) {
  return unsigned((uint64_t(a) * uint64_t(b)) >> 32);
}
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  return std::atomic_ref<unsigned>(*p).fetch_add(v);
}
inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
using std::exp;
using std::fabs;
using std::isfinite;
using std::fmax;
using std::fmin;
using std::log;
using std::sqrt;
using std::tanh;
inline float expf(float x) { return std::exp(x); }
inline float logf(float x) { return std::log(x); }
inline float sqrtf(float x) { return std::sqrt(x); }
inline float fmaxf(float a, float b) { return std::fmax(a, b); }
inline float fminf(float a, float b) { return std::fmin(a, b); }
inline float fabsf(float x) { return std::fabs(x); }
inline float tanhf(float x) { return std::tanh(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

namespace emu {
// A kernel called through a cuLaunchKernel-style parameter array.
using Thunk = void (*)(void**);

template <class F>
struct Call;
template <class... A>
struct Call<void (*)(A...)> {
  template <void (*K)(A...), size_t... I>
  static void run(void** p, std::index_sequence<I...>) {
    K(*static_cast<std::remove_reference_t<A>*>(p[I])...);
  }
  template <void (*K)(A...)>
  static void thunk(void** p) {
    run<K>(p, std::index_sequence_for<A...>{});
  }
};

struct Entry {
  const char* name;
  Thunk thunk;
  unsigned params;
  // The kernel's `__launch_bounds__` (0: none) and its static `__shared__` bytes.
  unsigned max_threads;
  unsigned long shared_bytes;
};

template <class... A>
constexpr unsigned arity(void (*)(A...)) {
  return sizeof...(A);
}

// Run `k` over `grid` x `block`; false (with `err`) on a deadlock or a bad configuration.
bool launch(const Entry& k, dim3 grid, dim3 block, void** params, std::string& err);
}  // namespace emu

#define EMU_KERNEL(name, max_threads, shared_bytes)                                      \
  ::emu::Entry{#name, &::emu::Call<decltype(&name)>::thunk<&name>, ::emu::arity(&name), \
               (unsigned)(max_threads), (unsigned long)(shared_bytes)}
