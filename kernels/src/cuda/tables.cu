// CPU twin: `Engine::accumulate_loss_tables` (kernels/src/cpu/heads.rs). Held together by
// `tables::loss_table_kernel_matches_host_sums` and
// `tables::loss_tables_and_evaluation_match_the_cpu_backend` (kernels/tests/cuda/tables.rs).
//
// Loss-table accumulation on the device: block (k, chunk) adds, for word words[k], the
// -log-softmax rows z[p, :] (rows `ld` apart) of its positions p in
// positions[starts[k] .. starts[k + 1]] (summed in double, in that order) into
// table[words[k], :], one f32 addition per entry (as the CPU backend, so frequent words
// do not drift over a long pass).
extern "C" __global__ void table_accumulate(float* table, const float* z, const unsigned* words,
                                            const unsigned* starts, const unsigned* positions,
                                            unsigned width, unsigned ld) {
  unsigned k = blockIdx.x;
  unsigned j = blockIdx.y * blockDim.x + threadIdx.x;
  if (j >= width) return;
  double acc = 0.0;
  for (unsigned s = starts[k]; s < starts[k + 1]; ++s)
    acc += (double)z[(unsigned long long)positions[s] * ld + j];
  float* dst = table + (unsigned long long)words[k] * width + j;
  *dst = (float)((double)*dst + acc);
}
