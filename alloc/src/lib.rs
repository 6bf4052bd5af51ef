//! lightrnn-alloc: word allocation, called by a single-process run and by the coordinator
//! alike. [`round::reallocate`] is the central step of a reallocation round (move cost,
//! solve, keep-if-better, report); [`solve`] the solvers behind it; [`carry`] what the
//! ranks do with their vectors when the words move.
//!
//! Word allocation: assign the V words to distinct cells of the R x C table minimising
//! sum_w L_r[w, r(w)] + L_c[w, c(w)] — a linear assignment of V words to R*C cells
//! whose cost is separable: cost(w, (i, j)) = L_r[w, i] + L_c[w, j].
//!
//! Three solvers behind [`solve`], all returning a complete word -> cell permutation:
//! - [`Solver::Exact`]: shortest augmenting paths on candidate cells, then a dual
//!   certificate checked over all V x R*C pairs (cheap with the separable cost); pairs
//!   that violate it are added and the solve continues until none does. The result is
//!   optimal, without ever forming a dense V x V matrix.
//! - [`Solver::Scalable`]: prices from the row and column relaxation (words into rows of
//!   capacity C, into columns of capacity R; two small auctions), each word's best rows
//!   and columns under those prices as candidates, shortest augmenting paths on them,
//!   and a repair pass that places any word left over in its best free cell.
//! - [`Solver::Greedy`]: the heuristic of the official implementation (rows first, words
//!   in order of their expected loss, then columns row by row): the baseline.

mod auction;
pub mod carry;
mod cells;
mod costs;
mod decompose;
mod exact;
mod greedy;
mod improve;
mod prices;
pub mod round;
mod sap;
mod scalable;
pub mod sparse;

pub use carry::{Carry, carry_vectors};
pub use round::{
    Figures, Reallocation, Report, RoundOptions, SparsePart, SparseRound, nan_if_null, reallocate,
    reallocate_sparse,
};
pub use sparse::{SparseProblem, SparseTables, solve_sparse};

use serde::Serialize;

/// Element type of the loss tables.
pub trait Elem: Copy + Send + Sync + PartialOrd + Into<f64> + 'static {
    fn is_finite(self) -> bool;
}
impl Elem for f32 {
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
}
impl Elem for f64 {
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
}

/// Headroom of the solvers' sums over the largest table entry, per word and cell.
const LIMIT_FACTOR: f64 = 8.0;

/// An allocation problem: loss tables [V, R] and [V, C], row-major.
#[derive(Clone, Copy, Debug)]
pub struct Problem<'a, T> {
    pub vocab: usize,
    pub rows: usize,
    pub cols: usize,
    pub lr: &'a [T],
    pub lc: &'a [T],
}

/// Errors of the allocation step (bad tables; solver limits).
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Solver(String),
}

pub type Result<T, E = AllocError> = std::result::Result<T, E>;

impl<'a, T: Elem> Problem<'a, T> {
    /// Check shapes and values.
    pub fn new(vocab: usize, rows: usize, cols: usize, lr: &'a [T], lc: &'a [T]) -> Result<Self> {
        let bad = |m: String| Err(AllocError::Input(m));
        if vocab == 0 || rows == 0 || cols == 0 {
            return bad(format!("empty tables: V = {vocab}, R = {rows}, C = {cols}"));
        }
        if vocab > rows * cols {
            return bad(format!(
                "V = {vocab} words do not fit a {rows} x {cols} table"
            ));
        }
        if rows * cols > u32::MAX as usize {
            return bad(format!("a {rows} x {cols} table has more cells than 2^32"));
        }
        if lr.len() != vocab * rows || lc.len() != vocab * cols {
            return bad(format!(
                "row table has {} values and column table {}, expected {vocab} x {rows} and {vocab} x {cols}",
                lr.len(),
                lc.len()
            ));
        }
        // The solvers sum costs over words and along augmenting paths, and prices
        // move by cost differences: every such figure stays below LIMIT_FACTOR *
        // (V + R*C) * the largest |entry|, which must be a finite f64.
        let limit = f64::MAX / (LIMIT_FACTOR * (vocab + rows * cols) as f64);
        for (name, t, width) in [("row", lr, rows), ("column", lc, cols)] {
            if let Some(k) = t.iter().position(|x| !x.is_finite()) {
                return bad(format!(
                    "{name} table: entry [{}, {}] is not finite",
                    k / width,
                    k % width
                ));
            }
            let (k, big) = t
                .iter()
                .map(|&x| Into::<f64>::into(x).abs())
                .enumerate()
                .fold((0, 0.0f64), |a, (k, x)| if x > a.1 { (k, x) } else { a });
            if big > limit {
                return bad(format!(
                    "{name} table: entry [{}, {}] = {big:e} is too large: the allocation's \
                     sums would overflow f64 (entries must stay below {limit:.3e} for \
                     V = {vocab} in {rows} x {cols}); divide both tables by one constant, \
                     which does not change the allocation",
                    k / width,
                    k % width
                ));
            }
        }
        Ok(Self {
            vocab,
            rows,
            cols,
            lr,
            lc,
        })
    }

    #[inline]
    pub fn lr(&self, w: usize, i: usize) -> f64 {
        self.lr[w * self.rows + i].into()
    }

    #[inline]
    pub fn lc(&self, w: usize, j: usize) -> f64 {
        self.lc[w * self.cols + j].into()
    }

    #[inline]
    pub fn cost(&self, w: usize, cell: usize) -> f64 {
        self.lr(w, cell / self.cols) + self.lc(w, cell % self.cols)
    }

    pub fn cells(&self) -> usize {
        self.rows * self.cols
    }

    /// Total cost of an allocation.
    pub fn total(&self, cells: &[u32]) -> f64 {
        cells
            .iter()
            .enumerate()
            .map(|(w, &c)| self.cost(w, c as usize))
            .sum()
    }

    /// Word w's cheapest cell cost anywhere: min_i L_r[w, i] + min_j L_c[w, j].
    pub fn best(&self, w: usize) -> f64 {
        let r = (0..self.rows)
            .map(|i| self.lr(w, i))
            .fold(f64::INFINITY, f64::min);
        r + (0..self.cols)
            .map(|j| self.lc(w, j))
            .fold(f64::INFINITY, f64::min)
    }

    /// Word w's most expensive cell cost: max_i L_r[w, i] + max_j L_c[w, j].
    pub fn worst(&self, w: usize) -> f64 {
        let r = (0..self.rows)
            .map(|i| self.lr(w, i))
            .fold(f64::NEG_INFINITY, f64::max);
        r + (0..self.cols)
            .map(|j| self.lc(w, j))
            .fold(f64::NEG_INFINITY, f64::max)
    }

    /// sum_w (min_i L_r[w, i] + min_j L_c[w, j]): no allocation costs less.
    pub fn lower_bound(&self) -> f64 {
        (0..self.vocab).map(|w| self.best(w)).sum()
    }

    /// A complete allocation: V distinct cells of the table.
    pub fn check(&self, cells: &[u32]) -> Result<()> {
        lightrnn_kernels::check_cells(self.vocab, self.cells(), cells)
            .map_err(|e| AllocError::Solver(e.to_string()))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Solver {
    Exact,
    Scalable,
    Greedy,
}

impl std::str::FromStr for Solver {
    type Err = AllocError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "exact" => Ok(Self::Exact),
            "scalable" => Ok(Self::Scalable),
            "greedy" => Ok(Self::Greedy),
            o => Err(AllocError::Input(format!(
                "unknown solver {o:?} (exact, scalable or greedy)"
            ))),
        }
    }
}

impl Solver {
    pub fn name(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::Scalable => "scalable",
            Self::Greedy => "greedy",
        }
    }
}

/// Knobs of the solvers (defaults suit V from 10^3 to 10^7).
#[derive(Clone, Debug, Default)]
pub struct SolveOptions {
    /// Candidate rows and columns per word (0 = choose from the table size).
    pub candidates: usize,
    /// Worker threads (0 = all cores).
    pub threads: usize,
}

/// A solved allocation with what the solver learned about it.
#[derive(Clone, Debug, Serialize)]
pub struct Solution {
    /// word -> cell (row * C + col).
    #[serde(skip)]
    pub cells: Vec<u32>,
    pub cost: f64,
    pub lower_bound: f64,
    /// The dual value of the row/column relaxation (rows of capacity C and columns of
    /// capacity R, each on its own): also a lower bound, and a tighter one.
    pub relaxation_bound: f64,
    /// The exact solver's optimality certificate (dual objective), when it has one.
    pub dual_bound: Option<f64>,
    /// Solver-specific figures (rounds, candidate edges, repairs, ...).
    pub stats: serde_json::Value,
}

/// The most heap a scalable or greedy solve takes beyond its tables, on any values
/// (nearly uniform and tied tables included; tested in tests/memory.rs): 4 KiB per word,
/// 64 bytes per cell and 16 MiB. The exact solver adds at most 48 bytes for each of its
/// candidate edges, which it caps at 1024 per word (tables more tied than that are refused by it).
pub fn solve_memory_bound(vocab: usize, cells: usize) -> u64 {
    4096 * vocab as u64 + 64 * cells as u64 + (16 << 20)
}

/// [`solve_memory_bound`] for `solver`, the exact solver's edges included.
pub fn solver_memory_bound(solver: Solver, vocab: usize, cells: usize) -> u64 {
    let edges = match solver {
        Solver::Exact => 48 * (exact::MAX_EDGES_PER_WORD * vocab) as u64,
        _ => 0,
    };
    solve_memory_bound(vocab, cells) + edges
}

/// The memory of a reallocation round's central step on [`LossTables`] of V x (R + C):
/// the tables, a discounted copy when moves cost something, and the solve.
pub fn round_memory_bound(vocab: usize, rows: usize, cols: usize, move_cost: f64) -> u64 {
    let tables = tables_bytes(vocab, rows, cols);
    let copies = if move_cost > 0.0 { 2 } else { 1 };
    copies * tables + solve_memory_bound(vocab, rows * cols)
}

/// Bytes of [`SparseTables`] of V words with `k` candidates per side, with the counts.
pub fn sparse_bytes(vocab: usize, rows: usize, cols: usize, k: usize) -> u64 {
    let (kr, kc) = (k.clamp(1, rows.max(1)), k.clamp(1, cols.max(1)));
    (vocab * (8 * (kr + kc) + 24)) as u64
}

/// The memory of a reallocation round's central step on sparse tables: the tables as
/// their parts arrive and as the solver reads them, 512 bytes per word, 64 per cell and
/// 16 MiB. An estimate above every peak measured (docs/benchmarks.md, section 13: 957
/// MiB at V = 1M, k = 16, where this gives 1.1 GiB), to refuse a round before its
/// passes where the memory is clearly not there; not a tested bound.
pub fn sparse_round_memory_bound(vocab: usize, rows: usize, cols: usize, k: usize) -> u64 {
    2 * sparse_bytes(vocab, rows, cols, k)
        + 512 * vocab as u64
        + 64 * (rows * cols) as u64
        + (16 << 20)
}

/// Bytes of [`LossTables`] of V x (R + C) (f32 tables and u64 counts).
pub fn tables_bytes(vocab: usize, rows: usize, cols: usize) -> u64 {
    (vocab * (rows + cols) * 4 + vocab * 8) as u64
}

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
pub(crate) mod testutil {
    /// Tables with structure: a few popular rows/columns (congestion), word frequencies
    /// spread over two orders of magnitude, noise.
    pub fn tables(v: usize, r: usize, c: usize, seed: u64) -> (Vec<f64>, Vec<f64>) {
        let mut s = lightrnn_kernels::rng::Philox::new(seed, lightrnn_kernels::rng::Purpose::Other)
            .stream(0);
        let pop_r: Vec<f64> = (0..r).map(|i| 1.0 + 3.0 * (i as f64 / r as f64)).collect();
        let pop_c: Vec<f64> = (0..c)
            .map(|j| 1.0 + 3.0 * (((j * 7) % c) as f64 / c as f64))
            .collect();
        let mut lr = Vec::with_capacity(v * r);
        let mut lc = Vec::with_capacity(v * c);
        for w in 0..v {
            let count = 1.0 + 100.0 / (1.0 + w as f64);
            for p in &pop_r {
                lr.push(count * (p + s.next_f64()));
            }
            for p in &pop_c {
                lc.push(count * (p + s.next_f64()));
            }
        }
        (lr, lc)
    }

    /// The optimum by the dense Hungarian method (O(n^3), small n only).
    pub fn brute_force(p: &super::Problem<'_, f64>) -> f64 {
        let (n, m) = (p.vocab, p.cells());
        let inf = f64::INFINITY;
        let (mut u, mut v) = (vec![0.0; n + 1], vec![0.0; m + 1]);
        let (mut pm, mut way) = (vec![0usize; m + 1], vec![0usize; m + 1]);
        for i in 1..=n {
            pm[0] = i;
            let mut j0 = 0;
            let mut minv = vec![inf; m + 1];
            let mut used = vec![false; m + 1];
            loop {
                used[j0] = true;
                let (i0, mut delta, mut j1) = (pm[j0], inf, 0);
                for j in 1..=m {
                    if !used[j] {
                        let cur = p.cost(i0 - 1, j - 1) - u[i0] - v[j];
                        if cur < minv[j] {
                            minv[j] = cur;
                            way[j] = j0;
                        }
                        if minv[j] < delta {
                            delta = minv[j];
                            j1 = j;
                        }
                    }
                }
                for j in 0..=m {
                    if used[j] {
                        u[pm[j]] += delta;
                        v[j] -= delta;
                    } else {
                        minv[j] -= delta;
                    }
                }
                j0 = j1;
                if pm[j0] == 0 {
                    break;
                }
            }
            loop {
                let j1 = way[j0];
                pm[j0] = pm[j1];
                j0 = j1;
                if j0 == 0 {
                    break;
                }
            }
        }
        (1..=m)
            .filter(|&j| pm[j] != 0)
            .map(|j| p.cost(pm[j] - 1, j - 1))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_tables_are_refused() {
        let lr = vec![1.0f32; 6];
        let lc = vec![1.0f32; 6];
        assert!(Problem::new(3, 2, 2, &lr, &lc).is_ok());
        assert!(
            Problem::new(5, 2, 2, &lr, &lc)
                .unwrap_err()
                .to_string()
                .contains("do not fit")
        );
        assert!(
            Problem::new(3, 3, 2, &lr, &lc)
                .unwrap_err()
                .to_string()
                .contains("expected")
        );
        let mut bad = lr.clone();
        bad[4] = f32::NAN;
        assert!(
            Problem::new(3, 2, 2, &bad, &lc)
                .unwrap_err()
                .to_string()
                .contains("[2, 0]")
        );
    }

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
