//! The CPU backend: [`Engine`] (generic math) and [`CpuBackend`] (its `f32` instance behind
//! the [`crate::Backend`] boundary).

mod engine;
pub mod gemm;
pub mod simd;
pub mod team;

pub use engine::{
    Batch, Engine, LossSums, Pass, State, StreamId, check_allocation, random_allocation, row_of,
};

/// Best f32 GEMM rate (GFLOP/s) of this machine on `threads` threads: square products of
/// side `n`, each thread computing its own column block, as the backend splits its work.
pub fn gemm_peak_gflops(threads: usize, n: usize, reps: usize) -> crate::Result<f64> {
    let team = team::Team::new(threads)?;
    let a: Vec<f32> = (0..n * n)
        .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
        .collect();
    let b = a.clone();
    let mut c = vec![0f32; n * n];
    let nt = team.threads();
    let cs = team::Shared::new(&mut c);
    let mut best = 0f64;
    for rep in 0..reps + 1 {
        let t0 = std::time::Instant::now();
        team.run(|tid, _| {
            let cols = crate::layout::part_range(n, nt, tid);
            // SAFETY: each thread writes its own column block of c.
            unsafe {
                gemm::gemm(
                    n,
                    cols.len(),
                    n,
                    cs.ptr().add(cols.start),
                    n,
                    false,
                    gemm::Mat::rows(&a, n),
                    gemm::Mat::rows(&b, n).at(0, cols.start),
                )
            };
        });
        let s = t0.elapsed().as_secs_f64();
        if rep > 0 {
            best = best.max(2.0 * (n * n * n) as f64 / s / 1e9);
        }
    }
    Ok(best)
}
