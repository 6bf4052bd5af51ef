// CPU twin: the distinct input rows `Engine::input_forward` gathers (kernels/src/cpu/engine.rs)
// and `input_grads`' per-row sum of their gradients (kernels/src/cpu/backward.rs). Held
// together by `lstm::gather_and_scatter_rows_match_host_loops` (kernels/tests/cuda/lstm.rs)
// and the whole steps of kernels/tests/cuda/step.rs.
//
// The input tables: gathering the rows a batch reads, and the per-row sum of their
// gradients (deterministic: each distinct row sums its uses in a fixed order, no atomics).

// out[r, :] = table[ids[r], :] for r < rows.
extern "C" __global__ void gather_rows(float* out, const float* table, const unsigned* ids,
                                       unsigned rows, unsigned width) {
  unsigned long long n = (unsigned long long)rows * width;
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x) {
    unsigned long long r = i / width, j = i % width;
    out[i] = table[(unsigned long long)ids[r] * width + j];
  }
}

// For each distinct id k < *n_uniq (blocks grid-strided over them: the count is read from
// device memory, so one launch configuration serves every batch), table_grad[uniq[k], :] =
// the sum over its uses u in members[starts[k] .. starts[k + 1]] (ascending storage rows)
// of rows_grad[u, :].
extern "C" __global__ void scatter_rows(float* table_grad, const float* rows_grad,
                                        const unsigned* uniq, const unsigned* starts,
                                        const unsigned* members, const unsigned* n_uniq,
                                        unsigned width) {
  unsigned n = *n_uniq;
  for (unsigned k = blockIdx.x; k < n; k += gridDim.x) {
    unsigned s0 = starts[k], s1 = starts[k + 1];
    float* dst = table_grad + (unsigned long long)uniq[k] * width;
    for (unsigned j = threadIdx.x; j < width; j += blockDim.x) {
      float acc = 0.0f;
      for (unsigned s = s0; s < s1; ++s)
        acc += rows_grad[(unsigned long long)members[s] * width + j];
      dst[j] = acc;
    }
  }
}
