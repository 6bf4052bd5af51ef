// CPU twin: `simd::dropout_mask` (kernels/src/cpu/simd.rs), keyed per row as
// `engine::fill_mask` (kernels/src/cpu/engine.rs) keys it. Held together, bit for bit, by
// `lstm::dropout_masks_are_the_cpu_masks_bit_for_bit` (kernels/tests/cuda/lstm.rs).
//
// Dropout masks from the counter-based Philox4x32-10 stream of the CPU backend
// (kernels/src/rng.rs), so both devices draw the same mask for the same element: element j
// of row r of a time-major [S, B] block is element (g * width + j) of stream `site`, where
// g = (r / batch) * global + offset + r % batch is the row's index in the job's batch.
// One kernel does the forward (x * mask) and the backward (dy * mask) alike. The site is
// *site_base + site_off: the step's part is read from device memory, so a captured graph
// draws each step's own masks.

__device__ __forceinline__ unsigned philox_word(unsigned long long idx, unsigned long long site,
                                                unsigned k0, unsigned k1) {
  unsigned long long pos = idx >> 2;
  unsigned c0 = (unsigned)pos, c1 = (unsigned)(pos >> 32);
  unsigned c2 = (unsigned)site, c3 = (unsigned)(site >> 32);
  for (int round = 0; round < 10; ++round) {
    unsigned hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    unsigned hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    unsigned n0 = hi1 ^ c1 ^ k0;
    unsigned n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  unsigned lane = (unsigned)(idx & 3);
  return lane == 0 ? c0 : lane == 1 ? c1 : lane == 2 ? c2 : c3;
}

// out[r, j] = in[r, j] * mask[r, j] over rows x width (out may be in): mask is `keep` when
// the draw is >= threshold (= p * 2^32), else 0.
extern "C" __global__ void dropout_apply(float* out, const float* in, unsigned rows,
                                         unsigned width, unsigned key0, unsigned key1,
                                         const unsigned long long* site_base,
                                         unsigned long long site_off, unsigned batch,
                                         unsigned offset, unsigned global, unsigned threshold,
                                         float keep) {
  unsigned long long n = (unsigned long long)rows * width;
  unsigned long long site = *site_base + site_off;
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x) {
    unsigned long long r = i / width, j = i % width;
    unsigned long long g = (r / batch) * global + offset + r % batch;
    unsigned draw = philox_word(g * width + j, site, key0, key1);
    out[i] = draw >= threshold ? in[i] * keep : 0.0f;
  }
}
