// CPU twin: `simd::softmax_nll` and `simd::neg_log_softmax` (kernels/src/cpu/simd.rs), as
// `heads_thread` (kernels/src/cpu/heads.rs) runs them. Held together by
// `heads::fused_softmax_matches_the_cpu_in_every_mode` (kernels/tests/cuda/heads.rs).
//
// The heads' fused log-softmax + NLL, one block of 256 threads per row of `width` logits
// (rows `ld` apart: the device pads them to a multiple of 4). mode 0: the loss only (z
// left as z + b); 1: z := scale (softmax(z + b) - onehot(target)), the scale read from
// device memory; 2: z := -log softmax(z + b) (the loss tables). loss[row] = the target's
// NLL.

#define SOFTMAX_THREADS 256

// The block's maximum or sum of v (all threads get it); `buf` holds one value per warp.
__device__ __forceinline__ float block_reduce(float v, bool is_max, float* buf) {
  for (int o = 16; o > 0; o >>= 1) {
    float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = is_max ? fmaxf(v, w) : v + w;
  }
  unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  float r = buf[0];
  for (unsigned k = 1; k < SOFTMAX_THREADS / 32; ++k) r = is_max ? fmaxf(r, buf[k]) : r + buf[k];
  __syncthreads();
  return r;
}

extern "C" __global__ void __launch_bounds__(SOFTMAX_THREADS)
    softmax_nll(float* z, const float* bias, const unsigned* targets, double* loss,
                unsigned width, unsigned ld, const float* scale_at, unsigned mode) {
  __shared__ float buf[SOFTMAX_THREADS / 32];
  float* zr = z + (unsigned long long)blockIdx.x * ld;
  float mx = __int_as_float(0xff800000);  // -infinity
  for (unsigned j = threadIdx.x; j < width; j += SOFTMAX_THREADS) {
    float x = zr[j] + bias[j];
    zr[j] = x;
    mx = fmaxf(mx, x);
  }
  mx = block_reduce(mx, true, buf);
  float sum = 0.0f;
  for (unsigned j = threadIdx.x; j < width; j += SOFTMAX_THREADS) sum += expf(zr[j] - mx);
  sum = block_reduce(sum, false, buf);
  unsigned t = targets[blockIdx.x];
  float lse = mx + logf(sum);
  float zt = zr[t];
  __syncthreads();  // every thread has read z[t] before it is overwritten
  if (mode == 1) {
    float scale = *scale_at;
    float k = scale / sum;
    for (unsigned j = threadIdx.x; j < width; j += SOFTMAX_THREADS) {
      float p = expf(zr[j] - mx) * k;
      zr[j] = j == t ? p - scale : p;
    }
  } else if (mode == 2) {
    for (unsigned j = threadIdx.x; j < width; j += SOFTMAX_THREADS) zr[j] = lse - zr[j];
  }
  if (threadIdx.x == 0) loss[blockIdx.x] = (double)(lse - zt);
}
