#!/usr/bin/env bash
# The CUDA kernels under the sanitizers, on the emulated device (no GPU needed):
#  1. AddressSanitizer: the emulator's kernels built with -fsanitize=address, and the
#     kernel, CUDA-backend and parity tests run on it (every device buffer is an exact-size
#     heap allocation, so one element past the end is caught); then a planted
#     out-of-bounds write, which must be reported.
#  2. ThreadSanitizer: one OS thread per CUDA thread; the kernel tests on small grids must
#     show no race inside a kernel, and a planted missing __syncthreads must.
# Only the C++ side is instrumented: reports whose stacks hold no kernel frame (.cu) come
# from the uninstrumented Rust test harness and are not ours. Builds into target/sanitize.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=target/sanitize
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
# The test binary of the last build for `name`.
bin() { ls -t "$CARGO_TARGET_DIR"/debug/deps/"$1"-* | grep -v '\.d$' | head -1; }
# Reports that have a kernel frame (a .cu file) in their stacks.
kernel_reports() {
  awk '/^(WARNING: ThreadSanitizer|==[0-9]+==ERROR: AddressSanitizer)/ { n++ } n && /\.cu:[0-9]+/ { hit[n] = 1 } END { c = 0; for (k in hit) c++; print c }' "$1"
}

echo "== AddressSanitizer"
LIGHTRNN_EMU_SANITIZE=address cargo test -q -p lightrnn-kernels --features cuda \
  --test cuda --test parity --test gradcheck --test sanitize --no-run
export LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0
for t in cuda parity gradcheck sanitize; do "$(bin $t)" -q; done
if "$(bin sanitize)" --ignored --exact planted_out_of_bounds_write > "$OUT/asan.log" 2>&1; then
  echo "the planted out-of-bounds write was not caught" >&2; exit 1
fi
grep -q "heap-buffer-overflow" "$OUT/asan.log" && [[ $(kernel_reports "$OUT/asan.log") -ge 1 ]] \
  || { cat "$OUT/asan.log" >&2; echo "no AddressSanitizer report in a kernel" >&2; exit 1; }
echo "planted out-of-bounds write: caught ($(grep -m1 -o 'planted.cu:[0-9]*' "$OUT/asan.log"))"
unset LD_PRELOAD ASAN_OPTIONS

echo "== ThreadSanitizer"
LIGHTRNN_EMU_SANITIZE=thread cargo test -q -p lightrnn-kernels --features cuda \
  --test cuda --test sanitize --no-run
export LD_PRELOAD=$(g++ -print-file-name=libtsan.so) TSAN_OPTIONS="halt_on_error=0 exitcode=0"
"$(bin cuda)" -q dropout gather lstm_cell fused_softmax reductions optimizer_kernels clip_scale loss_table_kernel > "$OUT/tsan.log" 2>&1 \
  || { cat "$OUT/tsan.log" >&2; exit 1; }
"$(bin sanitize)" -q --exact the_same_kernel_with_its_barrier_is_race_free >> "$OUT/tsan.log" 2>&1 \
  || { cat "$OUT/tsan.log" >&2; exit 1; }
if [[ $(kernel_reports "$OUT/tsan.log") -ne 0 ]]; then
  cat "$OUT/tsan.log" >&2; echo "ThreadSanitizer reports a race inside a kernel" >&2; exit 1
fi
echo "kernel tests: no race inside a kernel"
"$(bin sanitize)" --ignored --exact planted_missing_syncthreads > "$OUT/race.log" 2>&1 || true
[[ $(kernel_reports "$OUT/race.log") -ge 1 ]] && grep -q "data race" "$OUT/race.log" \
  || { cat "$OUT/race.log" >&2; echo "the planted missing __syncthreads was not caught" >&2; exit 1; }
echo "planted missing __syncthreads: caught ($(grep -m1 -o 'planted.cu:[0-9]*' "$OUT/race.log"))"
