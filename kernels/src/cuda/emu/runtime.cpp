// The scheduler of the host emulation (see cuda_emu.h): blocks one at a time; the block's
// threads as fibers (default) or OS threads (LIGHTRNN_EMU_THREADS, for ThreadSanitizer).
#include "cuda_emu.h"

#include <condition_variable>
#include <mutex>
#include <thread>

#if !defined(LIGHTRNN_EMU_THREADS) && !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace emu {
thread_local dim3 t_thread;
thread_local dim3 t_block;
dim3 g_block_dim;
dim3 g_grid_dim;

namespace {
unsigned linear(dim3 t) { return t.x + g_block_dim.x * (t.y + g_block_dim.y * t.z); }
unsigned block_threads() { return g_block_dim.x * g_block_dim.y * g_block_dim.z; }
dim3 unlinear(unsigned i) {
  return dim3(i % g_block_dim.x, (i / g_block_dim.x) % g_block_dim.y,
              i / (g_block_dim.x * g_block_dim.y));
}
// Values a warp exchanges in a shuffle, by linear thread index.
std::vector<float> g_lanes;
}  // namespace

unsigned lane_id() { return linear(t_thread) % 32; }

// What a GPU refuses at launch: more threads than the block limit or the kernel's
// `__launch_bounds__`, a block deeper than 64, a grid beyond 2^31 - 1 x 65,535 x 65,535, or
// more than 48 KB of static shared memory.
static bool launch_fits(const Entry& k, dim3 grid, dim3 block, std::string& err) {
  unsigned long threads = (unsigned long)block.x * block.y * block.z;
  std::string why;
  if (threads == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0)
    why = "an empty grid or block";
  else if (threads > 1024 || block.x > 1024 || block.y > 1024)
    why = std::to_string(threads) + " threads per block (at most 1024)";
  else if (block.z > 64)
    why = "a block " + std::to_string(block.z) + " deep in z (at most 64)";
  else if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    why = "a grid beyond 2^31 - 1 x 65,535 x 65,535";
  else if (k.max_threads > 0 && threads > k.max_threads)
    why = std::to_string(threads) + " threads per block, beyond its __launch_bounds__(" +
          std::to_string(k.max_threads) + ")";
  else if (k.shared_bytes > 48 * 1024)
    why = std::to_string(k.shared_bytes) + " bytes of static shared memory (at most 48 KB)";
  else
    return true;
  err = std::string("invalid launch of ") + k.name + ": " + why;
  return false;
}

#ifndef LIGHTRNN_EMU_THREADS
// ---------------------------------------------------------------- fibers
// A context switch is a stack switch: on x86-64 six callee-saved registers and the stack
// pointer (~30 ns; glibc's swapcontext makes a system call per switch, ~20x slower);
// elsewhere ucontext.
namespace {
#if defined(__x86_64__)
extern "C" void lightrnn_emu_switch(void** save_sp, void* new_sp);
asm(R"(
  .text
  .globl lightrnn_emu_switch
  .type lightrnn_emu_switch,@function
lightrnn_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size lightrnn_emu_switch, .-lightrnn_emu_switch
)");
struct Context {
  void* sp = nullptr;
};
void switch_to(Context& from, Context& to) { lightrnn_emu_switch(&from.sp, to.sp); }
void make_context(Context& c, std::vector<char>& stack, void (*entry)()) {
  // The new stack: six zeroed registers, then `entry` as the return address, 16-byte
  // aligned so that `entry` starts as if called.
  uintptr_t top = (uintptr_t)(stack.data() + stack.size()) & ~uintptr_t(15);
  void** sp = (void**)(top - 16);
  sp[0] = (void*)entry;
  sp -= 6;
  for (int i = 0; i < 6; ++i) sp[i] = nullptr;
  c.sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};
void switch_to(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
void make_context(Context& c, std::vector<char>& stack, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack.data();
  c.uc.uc_stack.ss_size = stack.size();
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

enum class Wait { None, Block, Warp, Done };
struct Fiber {
  Context ctx;
  std::vector<char> stack;
  Wait wait = Wait::None;
};
constexpr size_t kStack = 128 * 1024;
Context g_sched;
std::vector<Fiber> g_fibers;
unsigned g_current = 0;
Thunk g_thunk = nullptr;
void** g_params = nullptr;

void yield(Wait w) {
  Fiber& f = g_fibers[g_current];
  f.wait = w;
  switch_to(f.ctx, g_sched);
}

[[noreturn]] void fiber_main() {
  g_thunk(g_params);
  yield(Wait::Done);
  __builtin_unreachable();  // a finished fiber is never resumed
}

// Run one block to completion; false (with `err`) when it deadlocks.
bool run_block(unsigned n, std::string& err) {
  if (g_fibers.size() < n) g_fibers.resize(n);
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = g_fibers[i];
    if (f.stack.empty()) f.stack.resize(kStack);
    make_context(f.ctx, f.stack, fiber_main);
    f.wait = Wait::None;
  }
  unsigned warps = (n + 31) / 32;
  for (;;) {
    bool ran = false;
    for (unsigned i = 0; i < n; ++i) {
      if (g_fibers[i].wait != Wait::None) continue;
      g_current = i;
      t_thread = unlinear(i);
      switch_to(g_sched, g_fibers[i].ctx);
      ran = true;
    }
    unsigned done = 0, at_block = 0;
    for (unsigned i = 0; i < n; ++i) {
      done += g_fibers[i].wait == Wait::Done;
      at_block += g_fibers[i].wait == Wait::Block;
    }
    if (done == n) return true;
    if (at_block > 0 && at_block + done == n) {
      if (done > 0) {
        err = "__syncthreads deadlock: " + std::to_string(at_block) + " threads of block (" +
              std::to_string(t_block.x) + "," + std::to_string(t_block.y) +
              ") wait at a barrier that " + std::to_string(done) + " threads exited without reaching";
        return false;
      }
      for (unsigned i = 0; i < n; ++i) g_fibers[i].wait = Wait::None;
      continue;
    }
    bool released = false;
    for (unsigned w = 0; w < warps; ++w) {
      unsigned lo = 32 * w, hi = std::min(n, lo + 32), at = 0;
      for (unsigned i = lo; i < hi; ++i) at += g_fibers[i].wait == Wait::Warp;
      if (at == hi - lo) {
        for (unsigned i = lo; i < hi; ++i) g_fibers[i].wait = Wait::None;
        released = true;
      }
    }
    if (!released && !ran) {
      err = "deadlock in block (" + std::to_string(t_block.x) + "," + std::to_string(t_block.y) +
            "): " + std::to_string(at_block) + " threads at __syncthreads, " +
            std::to_string(n - at_block - done) + " at a warp shuffle, " + std::to_string(done) +
            " exited";
      return false;
    }
  }
}
}  // namespace

void sync_block() { yield(Wait::Block); }

float warp_exchange(float v, unsigned src) {
  unsigned me = linear(t_thread);
  unsigned base = me / 32 * 32;
  g_lanes[me] = v;
  yield(Wait::Warp);  // every lane has written
  float out = base + src < block_threads() ? g_lanes[base + src] : v;
  yield(Wait::Warp);  // every lane has read
  return out;
}

bool launch(const Entry& k, dim3 grid, dim3 block, void** params, std::string& err) {
  g_block_dim = block;
  g_grid_dim = grid;
  if (!launch_fits(k, grid, block, err)) return false;
  unsigned n = block_threads();
  g_lanes.assign(n, 0.0f);
  g_thunk = k.thunk;
  g_params = params;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        t_block = dim3(x, y, z);
        if (!run_block(n, err)) {
          err = std::string(k.name) + ": " + err;
          return false;
        }
      }
  return true;
}

#else
// ---------------------------------------------------------------- OS threads
namespace {
// A reusable barrier that ThreadSanitizer understands (mutex + condition variable).
struct Barrier {
  std::mutex m;
  std::condition_variable cv;
  unsigned n = 0, waiting = 0, generation = 0;
  void wait() {
    std::unique_lock<std::mutex> lk(m);
    unsigned gen = generation;
    if (++waiting == n) {
      waiting = 0;
      ++generation;
      cv.notify_all();
    } else {
      cv.wait(lk, [&] { return gen != generation; });
    }
  }
};
Barrier g_block_barrier;
std::vector<Barrier> g_warp_barriers;
}  // namespace

void sync_block() { g_block_barrier.wait(); }

float warp_exchange(float v, unsigned src) {
  unsigned me = linear(t_thread);
  unsigned base = me / 32 * 32;
  Barrier& b = g_warp_barriers[me / 32];
  g_lanes[me] = v;
  b.wait();
  float out = base + src < block_threads() ? g_lanes[base + src] : v;
  b.wait();
  return out;
}

bool launch(const Entry& k, dim3 grid, dim3 block, void** params, std::string& err) {
  g_block_dim = block;
  g_grid_dim = grid;
  if (!launch_fits(k, grid, block, err)) return false;
  unsigned n = block_threads();
  g_lanes.assign(n, 0.0f);
  g_block_barrier.n = n;
  unsigned warps = (n + 31) / 32;
  g_warp_barriers = std::vector<Barrier>(warps);
  for (unsigned w = 0; w < warps; ++w) g_warp_barriers[w].n = std::min(32u, n - 32 * w);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        dim3 b(x, y, z);
        std::vector<std::thread> threads;
        threads.reserve(n);
        for (unsigned i = 0; i < n; ++i)
          threads.emplace_back([&, i, b] {
            t_block = b;
            t_thread = unlinear(i);
            k.thunk(params);
          });
        for (auto& t : threads) t.join();
      }
  return true;
}
#endif
}  // namespace emu
