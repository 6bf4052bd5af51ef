// CPU twin: `simd::cell_forward` and `simd::cell_backward` (kernels/src/cpu/simd.rs), as
// `recurrent_step` (cpu/forward.rs) and `through_time` (cpu/backward.rs) run them. Held
// together by `lstm::lstm_cell_kernels_match_the_cpu_cell` (kernels/tests/cuda/lstm.rs).
//
// The LSTM cell of one step for all streams, fused with the biases and activations.
// Gates are PyTorch's order (i, f, g, o blocks of `hidden` rows); one thread per
// (stream, unit). The activations match the CPU backend's: sigmoid(x) = 1 / (1 + e^-x),
// tanh(x) = sign(x) (1 - e) / (1 + e) with e = e^(-2|x|).

__device__ __forceinline__ float sigm(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float tanh_stable(float x) {
  float e = expf(-2.0f * fabsf(x));
  float t = (1.0f - e) / (1.0f + e);
  return x < 0.0f ? -t : t;
}

// g: [batch, 4 hidden] pre-activations without biases (in) -> activations (out);
// c_prev, c, tc, h: [batch, hidden]. c = f c_prev + i g, tc = tanh(c), h = o tc.
extern "C" __global__ void lstm_cell_forward(float* g, const float* b_ih, const float* b_hh,
                                             const float* c_prev, float* c, float* tc, float* h,
                                             unsigned batch, unsigned hidden) {
  unsigned n = batch * hidden;
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    unsigned b = i / hidden, u = i % hidden;
    float* gr = g + (unsigned long long)b * 4 * hidden;
    float ig = sigm(gr[u] + (b_ih[u] + b_hh[u]));
    float fg = sigm(gr[hidden + u] + (b_ih[hidden + u] + b_hh[hidden + u]));
    float gt = tanh_stable(gr[2 * hidden + u] + (b_ih[2 * hidden + u] + b_hh[2 * hidden + u]));
    float og = sigm(gr[3 * hidden + u] + (b_ih[3 * hidden + u] + b_hh[3 * hidden + u]));
    float cn = fg * c_prev[i] + ig * gt;
    float t = tanh_stable(cn);
    gr[u] = ig;
    gr[hidden + u] = fg;
    gr[2 * hidden + u] = gt;
    gr[3 * hidden + u] = og;
    c[i] = cn;
    tc[i] = t;
    h[i] = og * t;
  }
}

// The step's backward: g holds the activations (in) -> d loss / d pre-activation (out);
// dh: [batch, hidden] gradient from above, dh_rec the recurrent one (ignored when
// has_rec = 0); dc carries d loss / d c from the next step in and to the previous out.
extern "C" __global__ void lstm_cell_backward(float* g, const float* dh, const float* dh_rec,
                                              unsigned has_rec, const float* c_prev,
                                              const float* tc, float* dc, unsigned batch,
                                              unsigned hidden) {
  unsigned n = batch * hidden;
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    unsigned b = i / hidden, u = i % hidden;
    float* gr = g + (unsigned long long)b * 4 * hidden;
    float ig = gr[u], fg = gr[hidden + u], gg = gr[2 * hidden + u], og = gr[3 * hidden + u];
    float d = dh[i] + (has_rec ? dh_rec[i] : 0.0f);
    float t = tc[i];
    float d_o = d * t;
    float dcn = dc[i] + d * og * (1.0f - t * t);
    gr[u] = dcn * gg * ig * (1.0f - ig);
    gr[hidden + u] = dcn * c_prev[i] * fg * (1.0f - fg);
    gr[2 * hidden + u] = dcn * ig * (1.0f - gg * gg);
    gr[3 * hidden + u] = d_o * og * (1.0f - og);
    dc[i] = dcn * fg;
  }
}
