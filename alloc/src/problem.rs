//! The allocation problem and what its solve is asked and answers: the loss tables
//! ([`Problem`], checked when made; [`Elem`] their element type), the solver to use
//! ([`Solver`]) and its knobs ([`SolveOptions`]), and the allocation found ([`Solution`]).

use serde::Serialize;

use crate::error::{AllocError, Result};

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
pub(crate) const LIMIT_FACTOR: f64 = 8.0;

/// An allocation problem: loss tables [V, R] and [V, C], row-major.
#[derive(Clone, Copy, Debug)]
pub struct Problem<'a, T> {
    pub vocab: usize,
    pub rows: usize,
    pub cols: usize,
    pub lr: &'a [T],
    pub lc: &'a [T],
}

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
}
