//! Sparse loss tables: for every word its k cheapest rows and k cheapest columns with
//! their exact losses, and the exact sums of its whole row and column tables. V x 2k
//! entries instead of V x (R + C): 2.6 GB at V = 10M and k = 16, where the dense tables
//! take 253 GB.
//!
//! What the solvers see of an entry outside a word's candidates (its *tail*):
//! - the **estimate** (the solvers' costs): the mean of the word's non-candidate entries,
//!   (sum - sum of the k candidates) / (R - k). Every non-candidate entry is at least the
//!   k-th candidate, so the estimate is too: the candidates stay the cheapest entries.
//! - the **floor** (the bounds): the k-th candidate's loss, which no tail entry is below.
//!   Tables with the floor in every tail entry lie below the true tables everywhere, so
//!   their optimum, their relaxation bound and each word's best cell bound the true
//!   problem from below: the bounds reported on sparse tables are valid bounds of the
//!   dense problem.
//!
//! A solution's cost is exact for every word placed in one of its candidate rows and
//! columns; for a word placed elsewhere it counts the estimate, and the solution reports
//! how many words that is and the interval the true cost lies in (the floor, and the
//! most a single tail entry can be: the tail's sum less the floor for all its other
//! entries).
//!
//! Up to [`CELL_AUCTION_MAX`] words the solvers run on the dense estimate tables (the
//! exact solver on the floor tables, so that its dual value bounds the true optimum, and
//! a solution using only candidate cells is proven optimal for the true tables); beyond,
//! the scalable solver's large-table path (heavy words by cells, rows, columns, local
//! improvement) runs on the sparse tables directly in O(V k) memory.

use rayon::prelude::*;

use lightrnn_kernels::LossTables;

use super::cells::{self, CELL_AUCTION_MAX, RELAX_SAMPLE, Relaxation};
use super::costs::{Costs, FreeCols};
use super::prices::{BinAuction, SparseCosts, sparse_bin_auction};
use super::problem::LIMIT_FACTOR;
use super::sap::NONE;
use super::solve::{self, solve_in};
use super::{AllocError, Elem, Problem, Result, Solution, SolveOptions, Solver};

/// Sparse loss tables (the layout of `lightrnn tables --sparse` and of the files
/// `lightrnn allocate --tables` reads; docs/allocation.md, "Sparse tables").
#[derive(Clone, Debug, PartialEq)]
pub struct SparseTables {
    pub vocab: usize,
    pub rows: usize,
    pub cols: usize,
    /// Candidate rows and columns per word.
    pub k_rows: usize,
    pub k_cols: usize,
    /// [V, k_rows]: each word's cheapest rows, cheapest first, and their losses.
    pub row_idx: Vec<u32>,
    pub row_loss: Vec<f32>,
    /// [V, k_cols]: the same for the columns.
    pub col_idx: Vec<u32>,
    pub col_loss: Vec<f32>,
    /// [V]: the sum of each word's whole row table, and of its whole column table.
    pub row_sum: Vec<f64>,
    pub col_sum: Vec<f64>,
}

/// One side (rows or columns) of sparse tables, as the checks and the tails read it.
struct Side<'a> {
    name: &'static str,
    width: usize,
    k: usize,
    idx: &'a [u32],
    loss: &'a [f32],
    sum: &'a [f64],
}

impl Side<'_> {
    /// Check word w's candidates; return its (estimate, floor, ceiling) for tail entries
    /// (infinite when every entry is a candidate).
    fn tail(&self, w: usize, limit: f64, seen: &mut [u32]) -> Result<(f64, f64, f64)> {
        let (ids, ls) = (
            &self.idx[w * self.k..(w + 1) * self.k],
            &self.loss[w * self.k..(w + 1) * self.k],
        );
        let bad = |m: String| {
            Err(AllocError::Input(format!(
                "{} candidates of word {w}: {m}",
                self.name
            )))
        };
        let mut top = 0.0f64;
        for (s, (&b, &l)) in ids.iter().zip(ls).enumerate() {
            if b as usize >= self.width {
                return bad(format!("index {b} outside 0..{}", self.width));
            }
            if seen[b as usize] == w as u32 + 1 {
                return bad(format!("index {b} listed twice"));
            }
            seen[b as usize] = w as u32 + 1;
            if !l.is_finite() || f64::from(l).abs() > limit {
                return bad(format!(
                    "loss {l} is not finite or too large (limit {limit:.3e})"
                ));
            }
            if s > 0 && l < ls[s - 1] {
                return bad("losses are not in increasing order".into());
            }
            top += f64::from(l);
        }
        let sum = self.sum[w];
        if !sum.is_finite() || sum.abs() > limit * self.width as f64 {
            return bad(format!("sum {sum} is not finite or too large"));
        }
        let rest = self.width - self.k;
        if rest == 0 {
            return Ok((f64::INFINITY, f64::INFINITY, f64::INFINITY));
        }
        let floor = f64::from(ls[self.k - 1]);
        let mean = (sum - top) / rest as f64;
        // The sum is of the same f32 entries, in f64 (or coarser): allow its rounding.
        let tol = 1e-4 * (sum.abs() / self.width as f64 + floor.abs()) + 1e-12;
        if mean < floor - tol {
            return bad(format!(
                "the sum {sum} leaves {mean} per non-candidate entry, below the {}-th \
                 candidate's loss {floor}: the candidates are not the cheapest entries or \
                 the sum is not of the whole table",
                self.k
            ));
        }
        let mean = mean.max(floor);
        let ceiling = (sum - top - (rest - 1) as f64 * floor).max(mean);
        Ok((mean, floor, ceiling))
    }
}

/// Per-word tail figures of one side.
struct Tails {
    estimate: Vec<f64>,
    floor: Vec<f64>,
    ceiling: Vec<f64>,
}

impl SparseTables {
    /// Check shapes and values (what [`SparseProblem::new`] relies on).
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(AllocError::Input(m));
        let (v, r, c) = (self.vocab, self.rows, self.cols);
        if v == 0 || r == 0 || c == 0 {
            return bad(format!("empty tables: V = {v}, R = {r}, C = {c}"));
        }
        if v > r * c {
            return bad(format!("V = {v} words do not fit a {r} x {c} table"));
        }
        if r * c > u32::MAX as usize {
            return bad(format!("a {r} x {c} table has more cells than 2^32"));
        }
        if self.k_rows == 0 || self.k_rows > r || self.k_cols == 0 || self.k_cols > c {
            return bad(format!(
                "{} candidate rows and {} candidate columns per word: each must be between 1 and R = {r} (C = {c})",
                self.k_rows, self.k_cols
            ));
        }
        for (name, len, want) in [
            ("rows", self.row_idx.len(), v * self.k_rows),
            ("row_loss", self.row_loss.len(), v * self.k_rows),
            ("cols", self.col_idx.len(), v * self.k_cols),
            ("col_loss", self.col_loss.len(), v * self.k_cols),
            ("row_sum", self.row_sum.len(), v),
            ("col_sum", self.col_sum.len(), v),
        ] {
            if len != want {
                return bad(format!("{name} has {len} values, expected {want}"));
            }
        }
        Ok(())
    }

    /// Cut dense tables: each word's `k` cheapest rows and columns (ties by index) and
    /// its sums (in f64).
    pub fn from_dense<T: Elem>(p: &Problem<'_, T>, k: usize) -> Self {
        let mut t = Self::empty(p.vocab, p.rows, p.cols, k);
        t.push_cut(p.vocab, &|w, i| p.lr(w, i), &|w, j| p.lc(w, j));
        t
    }

    /// Tables of no word yet, to be filled in word order by [`Self::push_range`]:
    /// `k` candidates per side (at most the side's width).
    pub fn empty(vocab: usize, rows: usize, cols: usize, k: usize) -> Self {
        let (kr, kc) = (k.clamp(1, rows.max(1)), k.clamp(1, cols.max(1)));
        Self {
            vocab,
            rows,
            cols,
            k_rows: kr,
            k_cols: kc,
            row_idx: Vec::with_capacity(vocab * kr),
            row_loss: Vec::with_capacity(vocab * kr),
            col_idx: Vec::with_capacity(vocab * kc),
            col_loss: Vec::with_capacity(vocab * kc),
            row_sum: Vec::with_capacity(vocab),
            col_sum: Vec::with_capacity(vocab),
        }
    }

    /// Words the tables hold so far (all of them once complete).
    pub fn filled(&self) -> usize {
        self.row_sum.len()
    }

    /// Append the cut of the dense tables of the next range of words (a pass of a
    /// range-by-range build): `t.words` must start where the tables end.
    pub fn push_range(&mut self, t: &LossTables) -> Result<()> {
        if (t.vocab, t.rows, t.cols) != (self.vocab, self.rows, self.cols) {
            return Err(AllocError::Input(format!(
                "loss tables of {}x({}+{}) for sparse tables of {}x({}+{})",
                t.vocab, t.rows, t.cols, self.vocab, self.rows, self.cols
            )));
        }
        let n = t.words.len();
        if t.words.start != self.filled() || t.lr.len() != n * t.rows || t.lc.len() != n * t.cols {
            return Err(AllocError::Input(format!(
                "loss tables of words {}..{} where the sparse tables end at word {}",
                t.words.start,
                t.words.end,
                self.filled()
            )));
        }
        let (rr, cc) = (t.rows, t.cols);
        self.push_cut(n, &|w, i| t.lr[w * rr + i] as f64, &|w, j| {
            t.lc[w * cc + j] as f64
        });
        Ok(())
    }

    /// Append the words of `part` (cut with the same k): its first word must be where the
    /// tables end.
    pub fn append(&mut self, start: usize, part: &SparseTables) -> Result<()> {
        if (part.rows, part.cols, part.k_rows, part.k_cols)
            != (self.rows, self.cols, self.k_rows, self.k_cols)
        {
            return Err(AllocError::Input(format!(
                "a part of {} + {} candidates of {} x {} for sparse tables of {} + {} of {} x {}",
                part.k_rows,
                part.k_cols,
                part.rows,
                part.cols,
                self.k_rows,
                self.k_cols,
                self.rows,
                self.cols
            )));
        }
        part.check()?;
        let n = part.vocab;
        if start != self.filled() || start + n > self.vocab {
            return Err(AllocError::Input(format!(
                "a part of words {start}..{} where the sparse tables of {} words end at word {}",
                start + n,
                self.vocab,
                self.filled()
            )));
        }
        self.row_idx.extend_from_slice(&part.row_idx);
        self.row_loss.extend_from_slice(&part.row_loss);
        self.col_idx.extend_from_slice(&part.col_idx);
        self.col_loss.extend_from_slice(&part.col_loss);
        self.row_sum.extend_from_slice(&part.row_sum);
        self.col_sum.extend_from_slice(&part.col_sum);
        Ok(())
    }

    /// Append `n` words whose dense entries are `lr(w, i)` and `lc(w, j)` (w from 0).
    pub(crate) fn push_cut(
        &mut self,
        n: usize,
        lr: &(dyn Fn(usize, usize) -> f64 + Sync),
        lc: &(dyn Fn(usize, usize) -> f64 + Sync),
    ) {
        let (kr, kc) = (self.k_rows, self.k_cols);
        let (rows, cols) = (self.rows, self.cols);
        // Each word's k cheapest (loss, index) of one side, ascending, written in place;
        // returns the side's sum (in index order). The scratch is one side's entries,
        // reused word after word: the cut holds nothing dense beyond its input.
        let cut = |e: &mut Vec<(f64, u32)>,
                   width: usize,
                   f: &dyn Fn(usize) -> f64,
                   idx: &mut [u32],
                   loss: &mut [f32]| {
            e.clear();
            e.extend((0..width).map(|i| (f(i), i as u32)));
            let by = |a: &(f64, u32), b: &(f64, u32)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
            let sum = e.iter().map(|x| x.0).sum::<f64>();
            let kk = idx.len();
            if kk < width {
                e.select_nth_unstable_by(kk - 1, by);
            }
            let top = &mut e[..kk];
            top.sort_unstable_by(by);
            for ((i, l), x) in idx.iter_mut().zip(loss.iter_mut()).zip(top.iter()) {
                (*i, *l) = (x.1, x.0 as f32);
            }
            sum
        };
        let (r0, c0, w0) = (self.row_idx.len(), self.col_idx.len(), self.row_sum.len());
        self.row_idx.resize(r0 + n * kr, 0);
        self.row_loss.resize(r0 + n * kr, 0.0);
        self.col_idx.resize(c0 + n * kc, 0);
        self.col_loss.resize(c0 + n * kc, 0.0);
        self.row_sum.resize(w0 + n, 0.0);
        self.col_sum.resize(w0 + n, 0.0);
        self.row_idx[r0..]
            .par_chunks_mut(kr)
            .zip(self.row_loss[r0..].par_chunks_mut(kr))
            .zip(self.col_idx[c0..].par_chunks_mut(kc))
            .zip(self.col_loss[c0..].par_chunks_mut(kc))
            .zip(self.row_sum[w0..].par_iter_mut())
            .zip(self.col_sum[w0..].par_iter_mut())
            .enumerate()
            .for_each_init(Vec::new, |e, (w, (((((ri, rl), ci), cl), rs), cs))| {
                *rs = cut(e, rows, &|i| lr(w, i), ri, rl);
                *cs = cut(e, cols, &|j| lc(w, j), ci, cl);
            });
    }

    /// Bytes the tables take in memory.
    pub fn bytes(&self) -> u64 {
        (self.vocab * (8 * (self.k_rows + self.k_cols) + 16)) as u64
    }

    fn sides(&self) -> [Side<'_>; 2] {
        [
            Side {
                name: "row",
                width: self.rows,
                k: self.k_rows,
                idx: &self.row_idx,
                loss: &self.row_loss,
                sum: &self.row_sum,
            },
            Side {
                name: "column",
                width: self.cols,
                k: self.k_cols,
                idx: &self.col_idx,
                loss: &self.col_loss,
                sum: &self.col_sum,
            },
        ]
    }
}

/// Checked sparse tables with their tails: what the solvers read.
pub struct SparseProblem<'a> {
    pub t: &'a SparseTables,
    rt: Tails,
    ct: Tails,
}

impl<'a> SparseProblem<'a> {
    pub fn new(t: &'a SparseTables) -> Result<Self> {
        t.check()?;
        let limit = f64::MAX / (LIMIT_FACTOR * (t.vocab + t.rows * t.cols) as f64);
        let [rs, cs] = t.sides();
        let tails = |s: &Side<'_>| -> Result<Tails> {
            let per: Vec<(f64, f64, f64)> = (0..t.vocab)
                .into_par_iter()
                .map_init(|| vec![0u32; s.width], |seen, w| s.tail(w, limit, seen))
                .collect::<Result<_>>()?;
            Ok(Tails {
                estimate: per.iter().map(|x| x.0).collect(),
                floor: per.iter().map(|x| x.1).collect(),
                ceiling: per.iter().map(|x| x.2).collect(),
            })
        };
        Ok(Self {
            rt: tails(&rs)?,
            ct: tails(&cs)?,
            t,
        })
    }

    #[inline]
    fn find(ids: &[u32], b: usize) -> Option<usize> {
        ids.iter().position(|&x| x as usize == b)
    }

    fn row_cands(&self, w: usize) -> (&[u32], &[f32]) {
        let k = self.t.k_rows;
        (
            &self.t.row_idx[w * k..(w + 1) * k],
            &self.t.row_loss[w * k..(w + 1) * k],
        )
    }

    fn col_cands(&self, w: usize) -> (&[u32], &[f32]) {
        let k = self.t.k_cols;
        (
            &self.t.col_idx[w * k..(w + 1) * k],
            &self.t.col_loss[w * k..(w + 1) * k],
        )
    }

    /// Entry (w, b) of one side: the candidate's loss, or the tail value `tail[w]`.
    #[inline]
    fn entry((ids, ls): (&[u32], &[f32]), b: usize, tail: f64) -> f64 {
        Self::find(ids, b).map_or(tail, |s| f64::from(ls[s]))
    }

    /// Dense f64 tables with the estimate (or, `floor`, the floor) in every tail entry.
    fn dense(&self, floor: bool) -> (Vec<f64>, Vec<f64>) {
        let t = self.t;
        let fill = |width: usize,
                    tail: &[f64],
                    cands: &(dyn Fn(usize) -> (&'a [u32], &'a [f32]) + Sync)| {
            let mut out = vec![0.0f64; t.vocab * width];
            out.par_chunks_mut(width).enumerate().for_each(|(w, row)| {
                row.fill(tail[w]);
                let (ids, ls) = cands(w);
                for (&b, &l) in ids.iter().zip(ls) {
                    row[b as usize] = f64::from(l);
                }
            });
            out
        };
        let (rt, ct) = if floor {
            (&self.rt.floor, &self.ct.floor)
        } else {
            (&self.rt.estimate, &self.ct.estimate)
        };
        let k = (t.k_rows, t.k_cols);
        let rows = |w: usize| {
            (
                &t.row_idx[w * k.0..(w + 1) * k.0],
                &t.row_loss[w * k.0..(w + 1) * k.0],
            )
        };
        let cols = |w: usize| {
            (
                &t.col_idx[w * k.1..(w + 1) * k.1],
                &t.col_loss[w * k.1..(w + 1) * k.1],
            )
        };
        (fill(t.rows, rt, &rows), fill(t.cols, ct, &cols))
    }

    /// Total estimated cost of an allocation, and the interval its true cost lies in.
    pub fn total(&self, cells: &[u32]) -> (f64, f64, f64) {
        let c = self.t.cols;
        cells
            .par_iter()
            .enumerate()
            .map(|(w, &cell)| {
                let (i, j) = (cell as usize / c, cell as usize % c);
                let side = |cands, b, t: &Tails| {
                    (
                        Self::entry(cands, b, t.estimate[w]),
                        Self::entry(cands, b, t.floor[w]),
                        Self::entry(cands, b, t.ceiling[w]),
                    )
                };
                let (r, cc) = (
                    side(self.row_cands(w), i, &self.rt),
                    side(self.col_cands(w), j, &self.ct),
                );
                (r.0 + cc.0, r.1 + cc.1, r.2 + cc.2)
            })
            .reduce(|| (0.0, 0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2))
    }

    /// Words placed outside their candidate rows, and outside their candidate columns.
    pub fn outside(&self, cells: &[u32]) -> (usize, usize) {
        let c = self.t.cols;
        cells
            .par_iter()
            .enumerate()
            .map(|(w, &cell)| {
                let (i, j) = (cell as usize / c, cell as usize % c);
                (
                    Self::find(self.row_cands(w).0, i).is_none() as usize,
                    Self::find(self.col_cands(w).0, j).is_none() as usize,
                )
            })
            .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    }

    /// sum_w (min_i L_r[w, i] + min_j L_c[w, j]): exact (the cheapest entries are candidates).
    pub fn lower_bound(&self) -> f64 {
        (0..self.t.vocab)
            .into_par_iter()
            .map(|w| Costs::best(self, w))
            .sum()
    }

    /// The row/column relaxation on the estimate costs (prices from auctions on a sample
    /// of the words, as the dense solvers do), its bound on the floor tables (valid for
    /// the true tables).
    pub fn relaxation(&self) -> Relaxation {
        let t0 = std::time::Instant::now();
        let t = self.t;
        let eps = 1e-4 * cells::mean_best_row(self) + 1e-9;
        let stride = t.vocab.div_ceil(RELAX_SAMPLE).max(1);
        let sample: Vec<u32> = (0..t.vocab).step_by(stride).map(|w| w as u32).collect();
        let scale = sample.len() as f64 / t.vocab as f64;
        let cap = |n: usize| ((n as f64 * scale).ceil() as usize).max(1);
        let side =
            |bins: usize, cap_b: usize, k: usize, idx: &[u32], loss: &[f32], tail: &[f64]| {
                sparse_bin_auction(
                    &vec![cap_b; bins],
                    eps,
                    &SparseCosts {
                        words: &sample,
                        k,
                        idx,
                        loss,
                        tail,
                    },
                )
            };
        let (ra, ca) = rayon::join(
            || {
                side(
                    t.rows,
                    cap(t.cols),
                    t.k_rows,
                    &t.row_idx,
                    &t.row_loss,
                    &self.rt.estimate,
                )
            },
            || {
                side(
                    t.cols,
                    cap(t.rows),
                    t.k_cols,
                    &t.col_idx,
                    &t.col_loss,
                    &self.ct.estimate,
                )
            },
        );
        let bound = side_bound(
            &ra.price,
            t.cols,
            t.k_rows,
            &t.row_idx,
            &t.row_loss,
            &self.rt.floor,
        ) + side_bound(
            &ca.price,
            t.rows,
            t.k_cols,
            &t.col_idx,
            &t.col_loss,
            &self.ct.floor,
        );
        Relaxation {
            bids: ra.bids + ca.bids,
            alpha: ra.price,
            beta: ca.price,
            bound,
            seconds: t0.elapsed().as_secs_f64(),
        }
    }
}

/// sum_w min_b (L[w, b] + price_b) - cap * sum_b price_b with the floor in every tail
/// entry: a lower bound of one side of the relaxation, for any prices >= 0.
fn side_bound(
    price: &[f64],
    cap: usize,
    k: usize,
    idx: &[u32],
    loss: &[f32],
    floor: &[f64],
) -> f64 {
    let mut by: Vec<u32> = (0..price.len() as u32).collect();
    by.sort_unstable_by(|&a, &b| price[a as usize].total_cmp(&price[b as usize]));
    let sum: f64 = (0..floor.len())
        .into_par_iter()
        .map(|w| {
            let (ids, ls) = (&idx[w * k..(w + 1) * k], &loss[w * k..(w + 1) * k]);
            let cand = ids
                .iter()
                .zip(ls)
                .map(|(&b, &l)| f64::from(l) + price[b as usize])
                .fold(f64::INFINITY, f64::min);
            let other = by
                .iter()
                .find(|b| !ids.contains(b))
                .map_or(f64::INFINITY, |&b| floor[w] + price[b as usize]);
            cand.min(other)
        })
        .sum();
    sum - cap as f64 * price.iter().sum::<f64>()
}

impl Costs for SparseProblem<'_> {
    type E = f32;
    fn vocab(&self) -> usize {
        self.t.vocab
    }
    fn rows(&self) -> usize {
        self.t.rows
    }
    fn cols(&self) -> usize {
        self.t.cols
    }
    fn lr(&self, w: usize, i: usize) -> f64 {
        Self::entry(self.row_cands(w), i, self.rt.estimate[w])
    }
    fn lc(&self, w: usize, j: usize) -> f64 {
        Self::entry(self.col_cands(w), j, self.ct.estimate[w])
    }
    fn best(&self, w: usize) -> f64 {
        f64::from(self.row_cands(w).1[0]) + f64::from(self.col_cands(w).1[0])
    }
    fn best_row(&self, w: usize) -> f64 {
        f64::from(self.row_cands(w).1[0])
    }
    fn tables_of(&self, w: usize, lr: &mut Vec<f32>, lc: &mut Vec<f32>) {
        for (out, width, (ids, ls), tail) in [
            (lr, self.t.rows, self.row_cands(w), self.rt.estimate[w]),
            (lc, self.t.cols, self.col_cands(w), self.ct.estimate[w]),
        ] {
            let at = out.len();
            out.resize(at + width, tail as f32);
            for (&b, &l) in ids.iter().zip(ls) {
                out[at + b as usize] = l;
            }
        }
    }
    fn best_sides(
        &self,
        w: usize,
        kr: usize,
        kc: usize,
        _: &mut Vec<(f64, u32)>,
    ) -> (Vec<u32>, Vec<u32>) {
        // Cheapest first already; a request beyond k repeats the last candidate (the
        // improvement skips cells it has looked at).
        let pick = |ids: &[u32], n: usize| (0..n).map(|s| ids[s.min(ids.len() - 1)]).collect();
        (pick(self.row_cands(w).0, kr), pick(self.col_cands(w).0, kc))
    }
    fn row_auction(&self, words: &[u32], caps: &[usize], eps: f64) -> BinAuction {
        sparse_bin_auction(
            caps,
            eps,
            &SparseCosts {
                words,
                k: self.t.k_rows,
                idx: &self.t.row_idx,
                loss: &self.t.row_loss,
                tail: &self.rt.estimate,
            },
        )
    }
    fn ranked_cols(
        &self,
        w: usize,
        free: &FreeCols,
        m: usize,
        price: &dyn Fn(u32) -> f64,
    ) -> Vec<u32> {
        let (ids, ls) = self.col_cands(w);
        let mut cs: Vec<(f64, u32)> = ids
            .iter()
            .zip(ls)
            .filter_map(|(&j, &l)| {
                let loc = free.local[j as usize];
                (loc != NONE).then(|| (f64::from(l) + price(loc), loc))
            })
            .collect();
        let tail = self.ct.estimate[w];
        if tail.is_finite() {
            cs.extend(
                free.by_price
                    .iter()
                    .filter(|&&l| !ids.contains(&free.cols[l as usize]))
                    .take(m)
                    .map(|&l| (tail + price(l), l)),
            );
        }
        if m < cs.len() {
            cs.select_nth_unstable_by(m - 1, |a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            cs.truncate(m);
        }
        cs.into_iter().map(|x| x.1).collect()
    }
    fn col_candidates(&self, w: usize) -> Option<(&[u32], &[f32], f64)> {
        let (ids, ls) = self.col_cands(w);
        Some((ids, ls, self.ct.estimate[w]))
    }
}

/// Solve sparse tables (see the module's documentation for what the figures mean).
pub fn solve_sparse(t: &SparseTables, solver: Solver, opts: &SolveOptions) -> Result<Solution> {
    let sp = SparseProblem::new(t)?;
    let large = t.vocab > CELL_AUCTION_MAX;
    if large && solver != Solver::Scalable {
        return Err(AllocError::Input(format!(
            "the {} solver on sparse tables runs up to {CELL_AUCTION_MAX} words (V = {}); \
             use the scalable solver",
            solver.name(),
            t.vocab
        )));
    }
    let pool = solve::pool(opts.threads)?;
    pool.install(|| {
        let (cells, dual_bound, mut stats, relaxation_bound) = if large {
            let rel = sp.relaxation();
            tracing::info!(
                seconds = rel.seconds,
                bids = rel.bids,
                bound = rel.bound,
                "allocation: row/column relaxation (sparse tables)"
            );
            let (cells, mut stats) = super::scalable::large(&sp, &rel.beta)?;
            if let Some(o) = stats.as_object_mut() {
                o.insert("seconds_prices".into(), rel.seconds.into());
            }
            (cells, None, stats, rel.bound)
        } else {
            let (er, ec) = sp.dense(false);
            let (fr, fc) = sp.dense(true);
            let est = Problem::new(t.vocab, t.rows, t.cols, &er, &ec)?;
            let low = Problem::new(t.vocab, t.rows, t.cols, &fr, &fc)?;
            match solver {
                // On the floor tables: their optimum bounds the true one from below, and
                // is the true optimum if it uses only candidate cells. Otherwise the
                // solution is the estimate tables' optimum (the floor tables' one favours
                // tail cells, whose true cost the floor understates), the bound the
                // floor tables'.
                Solver::Exact => {
                    let (cells, dual, stats, rel) = solve_in(&low, solver, opts)?;
                    let (out_r, out_c) = sp.outside(&cells);
                    if out_r + out_c == 0 {
                        (cells, dual, stats, rel)
                    } else {
                        let (cells, _, mut est_stats, _) = solve_in(&est, solver, opts)?;
                        if let Some(o) = est_stats.as_object_mut() {
                            o.insert(
                                "floor_tables".into(),
                                serde_json::json!({
                                    "dual_bound": dual,
                                    "words_outside_candidates": out_r + out_c,
                                    "stats": stats,
                                }),
                            );
                        }
                        (cells, dual, est_stats, rel)
                    }
                }
                _ => {
                    let (cells, dual, stats, _) = solve_in(&est, solver, opts)?;
                    (cells, dual, stats, cells::relaxation(&low).bound)
                }
            }
        };
        lightrnn_kernels::check_cells(t.vocab, t.rows * t.cols, &cells)
            .map_err(|e| AllocError::Solver(e.to_string()))?;
        let (cost, cost_min, cost_max) = sp.total(&cells);
        let (out_r, out_c) = sp.outside(&cells);
        if let Some(o) = stats.as_object_mut() {
            o.insert(
                "sparse".into(),
                serde_json::json!({
                    "k_rows": t.k_rows,
                    "k_cols": t.k_cols,
                    "words_outside_row_candidates": out_r,
                    "words_outside_col_candidates": out_c,
                    "cost_min": cost_min,
                    "cost_max": cost_max,
                    "proven_optimal": dual_bound.is_some_and(|d: f64| out_r + out_c == 0 && cost - d <= 1e-9 * cost.abs()),
                }),
            );
        }
        Ok(Solution {
            cost,
            lower_bound: sp.lower_bound(),
            relaxation_bound,
            dual_bound,
            cells,
            stats,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decompose, testutil};

    /// Range-by-range building (one pass per range of words) gives the cut of the whole
    /// tables; a range that does not continue the tables is refused.
    #[test]
    fn ranges_pushed_in_order_give_the_cut_of_the_whole_tables() {
        let (v, r, c) = (50usize, 8usize, 7usize);
        let (lr, lc) = testutil::tables(v, r, c, 5);
        let (fr, fc): (Vec<f32>, Vec<f32>) = (
            lr.iter().map(|&x| x as f32).collect(),
            lc.iter().map(|&x| x as f32).collect(),
        );
        let p = Problem::new(v, r, c, &fr, &fc).unwrap();
        let whole = SparseTables::from_dense(&p, 3);
        let range = |w: std::ops::Range<usize>| LossTables {
            vocab: v,
            rows: r,
            cols: c,
            lr: fr[w.start * r..w.end * r].to_vec(),
            lc: fc[w.start * c..w.end * c].to_vec(),
            counts: vec![1; w.len()],
            words: w,
        };
        let mut t = SparseTables::empty(v, r, c, 3);
        t.push_range(&range(0..17)).unwrap();
        assert!(t.push_range(&range(18..30)).is_err(), "a gap");
        assert!(t.push_range(&range(0..5)).is_err(), "a repeat");
        t.push_range(&range(17..50)).unwrap();
        assert_eq!(t.filled(), v);
        assert_eq!(t, whole);
        t.check().unwrap();
    }

    /// With every entry a candidate the sparse tables are the dense ones: the exact solver
    /// proves the dense optimum; with few candidates it states a valid lower bound, and
    /// its allocation is optimal for the estimate.
    #[test]
    fn exact_on_sparse_tables_proves_the_dense_optimum_or_bounds_it() {
        for (v, r, c, seed) in [(40usize, 7usize, 7usize, 21u64), (60, 8, 8, 22)] {
            let (lr, lc) = testutil::tables(v, r, c, seed);
            let p = Problem::new(v, r, c, &lr, &lc).unwrap();
            let best = testutil::brute_force(&p);
            let opts = SolveOptions {
                threads: 2,
                ..Default::default()
            };
            let full = SparseTables::from_dense(&p, r);
            let s = solve_sparse(&full, Solver::Exact, &opts).unwrap();
            // The sparse losses are f32.
            assert!((s.cost - best).abs() <= 1e-6 * best, "{} vs {best}", s.cost);
            assert_eq!(s.stats["sparse"]["proven_optimal"], true);
            for k in [2, 3] {
                let t = SparseTables::from_dense(&p, k);
                let s = solve_sparse(&t, Solver::Exact, &opts).unwrap();
                let d = s.dual_bound.unwrap();
                assert!(
                    d <= best * (1.0 + 1e-6),
                    "k={k}: dual {d} above the optimum {best}"
                );
                assert!(s.relaxation_bound <= best * (1.0 + 1e-6));
                assert!((s.lower_bound - p.lower_bound()).abs() <= 1e-6 * best);
                // The true cost of its allocation lies in the stated interval.
                let truth = p.total(&s.cells);
                let (lo, hi) = (
                    s.stats["sparse"]["cost_min"].as_f64().unwrap(),
                    s.stats["sparse"]["cost_max"].as_f64().unwrap(),
                );
                assert!(
                    lo <= truth * (1.0 + 1e-6) && truth <= hi * (1.0 + 1e-6),
                    "{lo} {truth} {hi}"
                );
                // Unproven, the allocation is the estimate tables' optimum.
                if s.stats["sparse"]["proven_optimal"] != true {
                    let sp = SparseProblem::new(&t).unwrap();
                    let (er, ec) = sp.dense(false);
                    let est = Problem::new(v, r, c, &er, &ec).unwrap();
                    let opt = testutil::brute_force(&est);
                    assert!(
                        (s.cost - opt).abs() <= 1e-6 * opt,
                        "k={k}: {} vs the estimate tables' optimum {opt}",
                        s.cost
                    );
                }
            }
        }
    }

    /// The large-table path on sparse tables (forced by a small heavy count through the
    /// same functions) matches the dense path's quality, and its bounds stay below the
    /// dense optimum.
    /// One row's columns on sparse tables: a word on its own cell at its tail cost
    /// stands for any non-candidate column, so the assignment is optimal for the sparse
    /// costs (brute force over every placement of the row's words in its free columns).
    #[test]
    fn a_rows_columns_on_sparse_tables_are_optimal_for_their_costs() {
        fn best(costs: &[Vec<f64>], used: &mut Vec<bool>, t: usize) -> f64 {
            if t == costs.len() {
                return 0.0;
            }
            let mut b = f64::INFINITY;
            for l in 0..used.len() {
                if !used[l] {
                    used[l] = true;
                    b = b.min(costs[t][l] + best(costs, used, t + 1));
                    used[l] = false;
                }
            }
            b
        }
        let (v, r, c) = (7usize, 3usize, 9usize);
        for seed in 0..20 {
            let (lr, lc) = testutil::tables(v, r, c, 100 + seed);
            let p = Problem::new(v, r, c, &lr, &lc).unwrap();
            let t = SparseTables::from_dense(&p, 2 + seed as usize % 3);
            let sp = SparseProblem::new(&t).unwrap();
            // Six words in a row whose column 4 is taken: 8 free columns.
            let cols: Vec<u32> = (0..c as u32).filter(|&j| j != 4).collect();
            let free = FreeCols::new(cols.clone(), c, &|l| (l * 7 % 5) as f64);
            let ws: Vec<u32> = (0..6).collect();
            let x = decompose::sparse_columns(&sp, &ws, &free).unwrap();
            let mut seen = x.clone();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(
                seen.len(),
                ws.len(),
                "seed {seed}: columns not distinct: {x:?}"
            );
            let costs: Vec<Vec<f64>> = ws
                .iter()
                .map(|&w| {
                    cols.iter()
                        .map(|&j| sp.lc(w as usize, j as usize))
                        .collect()
                })
                .collect();
            let got: f64 = x
                .iter()
                .enumerate()
                .map(|(t, &l)| costs[t][l as usize])
                .sum();
            let opt = best(&costs, &mut vec![false; cols.len()], 0);
            assert!(
                (got - opt).abs() <= 1e-9 * opt.abs(),
                "seed {seed}: {got} vs optimum {opt}"
            );
        }
        // Dense tables have no candidate lists: the general path.
        let (lr, lc) = testutil::tables(v, r, c, 1);
        let p = Problem::new(v, r, c, &lr, &lc).unwrap();
        let free = FreeCols::new((0..c as u32).collect(), c, &|l| l as f64);
        assert!(decompose::sparse_columns(&p, &[0, 1], &free).is_none());
    }

    #[test]
    fn large_path_on_sparse_tables_is_complete_close_and_bounded() {
        let (v, r, c) = (300usize, 18usize, 18usize);
        let (lr, lc) = testutil::tables(v, r, c, 31);
        let p = Problem::new(v, r, c, &lr, &lc).unwrap();
        let best = testutil::brute_force(&p);
        let t = SparseTables::from_dense(&p, 8);
        let sp = SparseProblem::new(&t).unwrap();
        let rel = sp.relaxation();
        assert!(rel.bound <= best * (1.0 + 1e-6), "{} vs {best}", rel.bound);
        let dense_rel = crate::cells::relaxation(&p);
        for heavy in [0, 40] {
            let (cells, _) = decompose::solve(&sp, &rel.beta, 1e-9, 4, heavy).unwrap();
            p.check(&cells).unwrap();
            let truth = p.total(&cells);
            let (dense, _) = decompose::solve(&p, &dense_rel.beta, 1e-9, 4, heavy).unwrap();
            let dense = p.total(&dense);
            eprintln!("heavy={heavy}: sparse {truth}, dense {dense}, optimum {best}");
            assert!(
                truth <= dense * 1.05,
                "heavy={heavy}: sparse {truth} vs dense {dense}"
            );
        }
        let (x, _) = crate::scalable::large(&sp, &rel.beta).unwrap();
        p.check(&x).unwrap();
        assert!(
            p.total(&x) <= best * 1.05,
            "{} vs optimum {best}",
            p.total(&x)
        );
    }

    #[test]
    fn inconsistent_sparse_tables_are_refused() {
        let (lr, lc) = testutil::tables(30, 6, 6, 41);
        let p = Problem::new(30, 6, 6, &lr, &lc).unwrap();
        let good = SparseTables::from_dense(&p, 3);
        assert!(SparseProblem::new(&good).is_ok());
        let mut t = good.clone();
        t.row_idx[4] = t.row_idx[3];
        assert!(
            SparseProblem::new(&t)
                .err()
                .unwrap()
                .to_string()
                .contains("twice")
        );
        let mut t = good.clone();
        t.col_idx[0] = 6;
        assert!(
            SparseProblem::new(&t)
                .err()
                .unwrap()
                .to_string()
                .contains("outside")
        );
        let mut t = good.clone();
        t.row_loss.swap(0, 1);
        assert!(
            SparseProblem::new(&t)
                .err()
                .unwrap()
                .to_string()
                .contains("increasing")
        );
        let mut t = good.clone();
        t.row_sum[2] = 0.0;
        assert!(
            SparseProblem::new(&t)
                .err()
                .unwrap()
                .to_string()
                .contains("below")
        );
        let mut t = good.clone();
        t.col_loss.pop();
        assert!(
            SparseProblem::new(&t)
                .err()
                .unwrap()
                .to_string()
                .contains("expected")
        );
        let mut t = good;
        t.row_loss[7] = f32::NAN;
        assert!(
            SparseProblem::new(&t)
                .err()
                .unwrap()
                .to_string()
                .contains("not finite")
        );
    }
}
