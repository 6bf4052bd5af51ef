//! What the large-table path ([`crate::decompose`]) and the local improvement
//! ([`crate::improve`]) read of the loss tables, for dense tables ([`Problem`]) and sparse
//! ones ([`crate::sparse::SparseProblem`]) alike: single entries, each word's cheapest
//! rows and columns, its whole table for the heavy words' sub-problem, and the two
//! operations whose cost depends on the layout (the row auction, and ranking a word's free
//! columns under prices).

use super::prices::{BinAuction, bin_auction};
use super::sap::NONE;
use super::{Elem, Problem};

/// The free columns of one row: their global indices, the map back (global -> local,
/// [`NONE`] for a taken column), and the local indices in increasing order of the prices
/// they are ranked under.
pub struct FreeCols {
    pub cols: Vec<u32>,
    pub local: Vec<u32>,
    pub by_price: Vec<u32>,
}

impl FreeCols {
    /// `cols` (global, increasing) of a table of `width` columns, ranked under `price`
    /// (indexed by local column).
    pub fn new(cols: Vec<u32>, width: usize, price: &dyn Fn(u32) -> f64) -> Self {
        let mut local = vec![NONE; width];
        for (l, &j) in cols.iter().enumerate() {
            local[j as usize] = l as u32;
        }
        let mut s = Self {
            cols,
            local,
            by_price: Vec::new(),
        };
        s.rank(price);
        s
    }

    /// Re-rank under new prices.
    pub fn rank(&mut self, price: &dyn Fn(u32) -> f64) {
        let mut by: Vec<(f64, u32)> = (0..self.cols.len() as u32).map(|l| (price(l), l)).collect();
        by.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        self.by_price = by.into_iter().map(|e| e.1).collect();
    }

    pub fn len(&self) -> usize {
        self.cols.len()
    }
}

/// Loss tables as the solvers' large-table path reads them.
pub trait Costs: Sync {
    /// Element type of the heavy words' dense sub-problem.
    type E: Elem;
    fn vocab(&self) -> usize;
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
    fn lr(&self, w: usize, i: usize) -> f64;
    fn lc(&self, w: usize, j: usize) -> f64;
    fn cells(&self) -> usize {
        self.rows() * self.cols()
    }
    fn cost(&self, w: usize, cell: usize) -> f64 {
        self.lr(w, cell / self.cols()) + self.lc(w, cell % self.cols())
    }
    /// min_i L_r[w, i] + min_j L_c[w, j].
    fn best(&self, w: usize) -> f64;
    /// min_i L_r[w, i].
    fn best_row(&self, w: usize) -> f64;
    /// Word w's whole row and column tables, appended to `lr` and `lc`.
    fn tables_of(&self, w: usize, lr: &mut Vec<Self::E>, lc: &mut Vec<Self::E>);
    /// Word w's `kr` cheapest rows and `kc` cheapest columns.
    fn best_sides(
        &self,
        w: usize,
        kr: usize,
        kc: usize,
        buf: &mut Vec<(f64, u32)>,
    ) -> (Vec<u32>, Vec<u32>);
    /// Rows for `words`: the transportation auction into bins (rows) of capacities `caps`.
    fn row_auction(&self, words: &[u32], caps: &[usize], eps: f64) -> BinAuction;
    /// The `m` cheapest free columns of word w under `price` (by local index; `free` is
    /// ranked under the same prices), as local indices.
    fn ranked_cols(
        &self,
        w: usize,
        free: &FreeCols,
        m: usize,
        price: &dyn Fn(u32) -> f64,
    ) -> Vec<u32>;
    /// Where the tables hold only each word's candidate columns: word w's candidates
    /// (global indices), their losses, and the one cost every other column has for it
    /// (infinite when every column is a candidate). `None` for dense tables.
    fn col_candidates(&self, _w: usize) -> Option<(&[u32], &[f32], f64)> {
        None
    }
}

/// The `k` smallest entries of `f(0..n)`, as indices (in selection order).
pub fn smallest(
    n: usize,
    k: usize,
    f: impl Fn(usize) -> f64,
    buf: &mut Vec<(f64, u32)>,
) -> Vec<u32> {
    buf.clear();
    buf.extend((0..n).map(|i| (f(i), i as u32)));
    let k = k.min(n);
    if k < n {
        buf.select_nth_unstable_by(k - 1, |a, b| a.0.total_cmp(&b.0));
    }
    buf[..k].iter().map(|e| e.1).collect()
}

impl<T: Elem> Costs for Problem<'_, T> {
    type E = T;
    fn vocab(&self) -> usize {
        self.vocab
    }
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn lr(&self, w: usize, i: usize) -> f64 {
        Problem::lr(self, w, i)
    }
    fn lc(&self, w: usize, j: usize) -> f64 {
        Problem::lc(self, w, j)
    }
    fn best(&self, w: usize) -> f64 {
        Problem::best(self, w)
    }
    fn best_row(&self, w: usize) -> f64 {
        (0..self.rows)
            .map(|i| Problem::lr(self, w, i))
            .fold(f64::INFINITY, f64::min)
    }
    fn tables_of(&self, w: usize, lr: &mut Vec<T>, lc: &mut Vec<T>) {
        lr.extend_from_slice(&self.lr[w * self.rows..(w + 1) * self.rows]);
        lc.extend_from_slice(&self.lc[w * self.cols..(w + 1) * self.cols]);
    }
    fn best_sides(
        &self,
        w: usize,
        kr: usize,
        kc: usize,
        buf: &mut Vec<(f64, u32)>,
    ) -> (Vec<u32>, Vec<u32>) {
        let rows = smallest(self.rows, kr, |i| Problem::lr(self, w, i), buf);
        let cols = smallest(self.cols, kc, |j| Problem::lc(self, w, j), buf);
        (rows, cols)
    }
    fn row_auction(&self, words: &[u32], caps: &[usize], eps: f64) -> BinAuction {
        bin_auction(words.len(), caps, eps, &|t, i| {
            Problem::lr(self, words[t] as usize, i)
        })
    }
    fn ranked_cols(
        &self,
        w: usize,
        free: &FreeCols,
        m: usize,
        price: &dyn Fn(u32) -> f64,
    ) -> Vec<u32> {
        let nf = free.len();
        let mut cs: Vec<(f64, u32)> = (0..nf as u32)
            .map(|l| {
                (
                    Problem::lc(self, w, free.cols[l as usize] as usize) + price(l),
                    l,
                )
            })
            .collect();
        if m < cs.len() {
            cs.select_nth_unstable_by(m - 1, |a, b| a.0.total_cmp(&b.0));
            cs.truncate(m);
        }
        cs.into_iter().map(|x| x.1).collect()
    }
}
