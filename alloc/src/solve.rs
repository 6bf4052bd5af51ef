//! [`solve()`]: the row/column relaxation and then the chosen solver, in a thread pool of
//! the requested size; and the pieces the sparse path shares with it ([`pool`],
//! [`solve_in`]).

use crate::error::{AllocError, Result};
use crate::problem::{Elem, Problem, Solution, SolveOptions, Solver};
use crate::{exact, greedy, scalable};

/// The solvers' thread pool (0 threads = all cores).
pub(crate) fn pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| AllocError::Solver(format!("cannot start threads: {e}")))
}

/// The relaxation and `solver` on `p`, in the current thread pool: the cells, the dual
/// bound, the solver's figures and the relaxation bound.
pub(crate) fn solve_in<T: Elem>(
    p: &Problem<'_, T>,
    solver: Solver,
    opts: &SolveOptions,
) -> Result<(Vec<u32>, Option<f64>, serde_json::Value, f64)> {
    let rel = crate::cells::relaxation(p);
    tracing::info!(
        seconds = rel.seconds,
        bids = rel.bids,
        bound = rel.bound,
        "allocation: row/column relaxation"
    );
    let (cells, dual, stats) = match solver {
        Solver::Exact => exact::solve(p, &rel, opts),
        Solver::Scalable => scalable::solve(p, &rel, opts),
        Solver::Greedy => Ok((greedy::solve(p), None, serde_json::json!({}))),
    }?;
    Ok((cells, dual, stats, rel.bound))
}

/// Solve `p` with `solver`.
pub fn solve<T: Elem>(p: &Problem<'_, T>, solver: Solver, opts: &SolveOptions) -> Result<Solution> {
    let (cells, dual_bound, stats, relaxation_bound) =
        pool(opts.threads)?.install(|| solve_in(p, solver, opts))?;
    p.check(&cells)?;
    Ok(Solution {
        cost: p.total(&cells),
        lower_bound: p.lower_bound(),
        relaxation_bound,
        dual_bound,
        cells,
        stats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decompose, testutil};

    #[test]
    fn all_solvers_return_complete_allocations_and_exact_is_optimal() {
        for (v, r, c, seed) in [
            (30usize, 6usize, 6usize, 1u64),
            (49, 7, 7, 2),
            (40, 5, 9, 3),
            (20, 4, 5, 4),
            (61, 8, 8, 5),
        ] {
            let (lr, lc) = testutil::tables(v, r, c, seed);
            let p = Problem::new(v, r, c, &lr, &lc).unwrap();
            let best = testutil::brute_force(&p);
            let opts = SolveOptions {
                threads: 2,
                ..Default::default()
            };
            let e = solve(&p, Solver::Exact, &opts).unwrap();
            assert!(
                (e.cost - best).abs() <= 1e-9 * best,
                "V={v}: exact {} vs optimum {best}",
                e.cost
            );
            let d = e.dual_bound.unwrap();
            assert!((d - best).abs() <= 1e-6 * best, "dual bound {d} vs {best}");
            let s = solve(&p, Solver::Scalable, &opts).unwrap();
            let g = solve(&p, Solver::Greedy, &opts).unwrap();
            assert!(s.cost >= best - 1e-9 * best && g.cost >= best - 1e-9 * best);
            assert!(
                s.cost <= g.cost + 1e-9 * best,
                "V={v}: scalable {} worse than greedy {}",
                s.cost,
                g.cost
            );
            assert!(e.lower_bound <= best + 1e-9);
        }
    }

    /// Few candidates force the certificate rounds, the widening of unplaceable words and
    /// the scalable solver's repair pass.
    #[test]
    fn exact_stays_optimal_and_scalable_complete_with_few_candidates() {
        for (v, r, c, seed) in [
            (300usize, 18usize, 18usize, 7u64),
            (250, 16, 17, 8),
            (324, 18, 18, 9),
        ] {
            let (lr, lc) = testutil::tables(v, r, c, seed);
            let p = Problem::new(v, r, c, &lr, &lc).unwrap();
            let best = testutil::brute_force(&p);
            for k in [1, 2, 3] {
                let opts = SolveOptions {
                    threads: 2,
                    candidates: k,
                };
                let e = solve(&p, Solver::Exact, &opts).unwrap();
                assert!(
                    (e.cost - best).abs() <= 1e-9 * best,
                    "V={v} k={k}: exact {} vs {best}",
                    e.cost
                );
                let s = solve(&p, Solver::Scalable, &opts).unwrap();
                assert!(s.cost >= best * (1.0 - 1e-12));
            }
            let s = solve(
                &p,
                Solver::Scalable,
                &SolveOptions {
                    threads: 2,
                    candidates: 0,
                },
            )
            .unwrap();
            let g = solve(&p, Solver::Greedy, &SolveOptions::default()).unwrap();
            assert!(
                s.cost <= best * 1.0005,
                "V={v}: scalable {} vs optimum {best}",
                s.cost
            );
            assert!(
                s.cost < g.cost,
                "V={v}: scalable {} not below greedy {}",
                s.cost,
                g.cost
            );
        }
    }

    /// The path for tables beyond the cell-level solver (heavy words by cells, rows,
    /// columns), at a size a test can check against the optimum, with and without heavy
    /// words; and the relaxation bound below the optimum.
    #[test]
    fn rows_then_columns_path_is_complete_and_close() {
        for (v, r, c, seed) in [(300usize, 18usize, 18usize, 11u64), (280, 17, 18, 12)] {
            let (lr, lc) = testutil::tables(v, r, c, seed);
            let p = Problem::new(v, r, c, &lr, &lc).unwrap();
            let best = testutil::brute_force(&p);
            let rel = crate::cells::relaxation(&p);
            assert!(
                rel.bound <= best * (1.0 + 1e-12),
                "bound {} vs {best}",
                rel.bound
            );
            assert!(rel.bound >= p.lower_bound() * (1.0 - 1e-9));
            let g = greedy::solve(&p);
            let greedy_cost = p.total(&g);
            for heavy in [0, 40, 100] {
                let (cells, stats) = decompose::solve(&p, &rel.beta, 1e-9, 4, heavy).unwrap();
                p.check(&cells).unwrap();
                assert_eq!(stats["heavy_words"], heavy);
                let cost = p.total(&cells);
                assert!(cost >= best * (1.0 - 1e-12));
                assert!(
                    cost <= best * 1.05,
                    "V={v} heavy={heavy}: {cost} vs optimum {best}"
                );
                if heavy > 0 {
                    assert!(
                        cost < greedy_cost,
                        "heavy={heavy}: {cost} vs greedy {greedy_cost}"
                    );
                }
            }
        }
    }
}
