// Kernels with planted bugs, compiled into the emulated device only (never shipped, not
// given to NVRTC): the sanitizer runs and the emulator's deadlock check must catch them.

// A missing __syncthreads between the shared-memory write and the neighbour's read: a data
// race ThreadSanitizer must report (scripts/sanitize-emulator.sh).
extern "C" __global__ void planted_missing_sync(float* out, const float* in) {
  __shared__ float s[256];
  unsigned t = threadIdx.x;
  s[t] = in[blockIdx.x * blockDim.x + t];
  out[blockIdx.x * blockDim.x + t] = s[(t + 1) % blockDim.x];
}

// The same with the barrier: race-free.
extern "C" __global__ void planted_with_sync(float* out, const float* in) {
  __shared__ float s[256];
  unsigned t = threadIdx.x;
  s[t] = in[blockIdx.x * blockDim.x + t];
  __syncthreads();
  out[blockIdx.x * blockDim.x + t] = s[(t + 1) % blockDim.x];
}

// An off-by-one write one element past the end: AddressSanitizer must report it.
extern "C" __global__ void planted_out_of_bounds(float* out, unsigned n) {
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) out[i] = 1.0f;
}

// A barrier only half the block reaches: the fiber scheduler reports a deadlock.
extern "C" __global__ void planted_partial_barrier(float* out) {
  if (threadIdx.x < blockDim.x / 2) __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// More static shared memory than a block may have (48 KB): the emulator refuses the
// launch, as the driver would.
extern "C" __global__ void planted_too_much_shared(float* out) {
  __shared__ float s[12 * 1024 + 1];
  s[threadIdx.x] = 1.0f;
  out[threadIdx.x] = s[threadIdx.x];
}
