// Optimizer updates over the flat parameter buffer, in the CPU backend's f32 arithmetic
// (kernels/src/optim.rs); `gs` is the gradient scale that carries the clipping, and the
// host folds the step-dependent constants (Adam's bias corrections) into the arguments.

// p += k g, k = -lr gs.
extern "C" __global__ void sgd_step(float* p, const float* g, unsigned long long n, float k) {
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x)
    p[i] += k * g[i];
}

// m = b1 m + c1 g; v = b2 v + c2 g^2; p -= step m / (sqrt(v) inv_bc2_sqrt + eps).
extern "C" __global__ void adam_step(float* p, const float* g, float* m, float* v,
                                     unsigned long long n, float gs, float b1, float b2,
                                     float c1, float c2, float step, float inv_bc2_sqrt,
                                     float eps) {
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

// s += g^2; p -= lr g / (sqrt(s) + eps).
extern "C" __global__ void adagrad_step(float* p, const float* g, float* s, unsigned long long n,
                                        float gs, float lr, float eps) {
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x) {
    float gi = g[i] * gs;
    float si = s[i] + gi * gi;
    s[i] = si;
    p[i] -= lr * gi / (sqrtf(si) + eps);
  }
}
