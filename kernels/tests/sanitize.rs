//! Kernels with planted bugs that only a sanitizer sees: scripts/sanitize-emulator.sh runs
//! these (ignored in the normal test run) with the emulator built under AddressSanitizer
//! and ThreadSanitizer, and requires each to be reported.
#![cfg(feature = "cuda")]

use lightrnn_kernels::cuda::emulated::Emulated;
use lightrnn_kernels::cuda::layer::{Arg, Device, Launch};

fn launch(dev: &Emulated, kernel: &'static str, block: u32, args: &[Arg]) {
    dev.launch(&Launch {
        kernel,
        grid: [2, 1, 1],
        block: [block, 1, 1],
        args,
    })
    .unwrap();
    // Queued work runs when the host waits.
    dev.synchronize().unwrap();
}

/// One element past the end of a 100-float buffer: AddressSanitizer must report a
/// heap-buffer-overflow (the GPU would write it silently).
#[test]
#[ignore = "run by scripts/sanitize-emulator.sh under AddressSanitizer"]
fn planted_out_of_bounds_write() {
    let dev = Emulated::new(1 << 20);
    let out = dev.alloc(100 * 4).unwrap();
    launch(
        &dev,
        "planted_out_of_bounds",
        64,
        &[Arg::Ptr(out.addr()), Arg::U32(100)],
    );
}

/// A shared-memory read of a neighbour's value without `__syncthreads`: ThreadSanitizer
/// (one OS thread per CUDA thread) must report a data race.
#[test]
#[ignore = "run by scripts/sanitize-emulator.sh under ThreadSanitizer"]
fn planted_missing_syncthreads() {
    let dev = Emulated::new(1 << 20);
    let (x, y) = (dev.alloc(64 * 4).unwrap(), dev.alloc(64 * 4).unwrap());
    launch(
        &dev,
        "planted_missing_sync",
        32,
        &[Arg::Ptr(y.addr()), Arg::Ptr(x.addr())],
    );
}

/// The same kernel with its barrier: clean under ThreadSanitizer.
#[test]
fn the_same_kernel_with_its_barrier_is_race_free() {
    let dev = Emulated::new(1 << 20);
    let (x, y) = (dev.alloc(64 * 4).unwrap(), dev.alloc(64 * 4).unwrap());
    launch(
        &dev,
        "planted_with_sync",
        32,
        &[Arg::Ptr(y.addr()), Arg::Ptr(x.addr())],
    );
}
