// CPU twin: `optim::update` and `optim::clip_coefficient` (kernels/src/optim.rs), as
// `Engine::optimizer_step` (kernels/src/cpu/engine.rs) and `CpuBackend::clip_and_step` run
// them. Held together by `optim::optimizer_kernels_match_the_cpu_updates` and
// `optim::clip_scale_is_the_host_coefficient` (kernels/tests/cuda/optim.rs).
//
// Optimizer updates over the flat parameter buffer, in the CPU backend's f32 arithmetic
// (kernels/src/optim.rs). What changes from step to step is read from device memory, so a
// captured graph replays unchanged: the clipping coefficient and whether to update at all
// (`clip_scale`, from the squared gradient norm the step just summed), the learning rate
// and Adam's bias corrections (uploaded with the step).

// One thread: norm = sqrt(*sum_sq); gs = min(1, max_norm / (norm + 1e-6)) when max_norm > 0
// and the norm is finite, else 1 (optim::clip_coefficient, in double); sgd_k = -lr gs;
// apply = whether the norm is finite (a step with a non-finite norm updates nothing).
extern "C" __global__ void clip_scale(const double* sum_sq, const double* lr,
                                      const double* max_norm, float* gs, float* sgd_k,
                                      unsigned* apply) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  double norm = sqrt(*sum_sq);
  bool finite = isfinite(norm);
  double m = *max_norm;
  double c = 1.0;
  if (m > 0.0 && finite) {
    c = m / (norm + 1e-6);
    if (c > 1.0) c = 1.0;
  }
  *gs = (float)c;
  *sgd_k = (float)(-*lr * c);
  *apply = finite ? 1u : 0u;
}

// p += k g, k = -lr gs.
extern "C" __global__ void sgd_step(float* p, const float* g, unsigned long long n,
                                    const float* k_at, const unsigned* apply) {
  if (!*apply) return;
  float k = *k_at;
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x)
    p[i] += k * g[i];
}

// m = b1 m + c1 g; v = b2 v + c2 g^2; p -= step m / (sqrt(v) inv_bc2_sqrt + eps), with
// g scaled by gs, step = lr / (1 - b1^t) and inv_bc2_sqrt = 1 / sqrt(1 - b2^t).
extern "C" __global__ void adam_step(float* p, const float* g, float* m, float* v,
                                     unsigned long long n, const float* gs_at, float b1,
                                     float b2, float c1, float c2, const float* step_at,
                                     const float* inv_bc2_sqrt_at, float eps,
                                     const unsigned* apply) {
  if (!*apply) return;
  float gs = *gs_at, step = *step_at, inv_bc2_sqrt = *inv_bc2_sqrt_at;
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x) {
    float gi = g[i] * gs;
    float mi = b1 * m[i] + c1 * gi;
    float vi = b2 * v[i] + c2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] -= step * mi / (sqrtf(vi) * inv_bc2_sqrt + eps);
  }
}

// s += g^2; p -= lr g / (sqrt(s) + eps), with g scaled by gs (lr in f32, as the CPU's).
extern "C" __global__ void adagrad_step(float* p, const float* g, float* s, unsigned long long n,
                                        const float* gs_at, const double* lr_at, float eps,
                                        const unsigned* apply) {
  if (!*apply) return;
  float gs = *gs_at, lr = (float)*lr_at;
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x) {
    float gi = g[i] * gs;
    float si = s[i] + gi * gi;
    s[i] = si;
    p[i] -= lr * gi / (sqrtf(si) + eps);
  }
}
