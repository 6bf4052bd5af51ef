// CPU twin: `simd::sum_sq` (kernels/src/cpu/simd.rs; `Engine::grad_norm`), the heads' loss
// sums (kernels/src/cpu/heads.rs) and `add_host`, the pairwise sum's addition
// (kernels/src/cpu/mod.rs). Held together by `optim::reductions_match_host_sums`
// (kernels/tests/cuda/optim.rs).
//
// Reductions in a fixed order (the same bits on every run): the gradient norm's sum of
// squares and sums of per-row losses; and the element-wise sum of two gradient buffers
// (the gradient groups' pairwise sum). Bias gradients are GEMMs with a ones vector.

#define REDUCE_THREADS 256

// The block's sum of v in double (thread 0 gets it).
__device__ __forceinline__ double block_sum(double v, double* buf) {
  buf[threadIdx.x] = v;
  __syncthreads();
  for (unsigned s = REDUCE_THREADS / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  return buf[0];
}

// partial[block] = sum of x[i]^2 (in double) over the block's grid-strided elements.
extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
    sum_sq_partial(double* partial, const float* x, unsigned long long n) {
  __shared__ double buf[REDUCE_THREADS];
  double acc = 0.0;
  for (unsigned long long i = (unsigned long long)blockIdx.x * REDUCE_THREADS + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * REDUCE_THREADS) {
    double v = x[i];
    acc += v * v;
  }
  double s = block_sum(acc, buf);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// out[k] = sum of in[k * n .. (k + 1) * n] (one block per k).
extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
    sum_f64(double* out, const double* in, unsigned n) {
  __shared__ double buf[REDUCE_THREADS];
  const double* row = in + (unsigned long long)blockIdx.x * n;
  double acc = 0.0;
  for (unsigned i = threadIdx.x; i < n; i += REDUCE_THREADS) acc += row[i];
  double s = block_sum(acc, buf);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

// x += y over n elements.
extern "C" __global__ void add_assign(float* x, const float* y, unsigned long long n) {
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x)
    x[i] += y[i];
}
