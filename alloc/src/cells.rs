//! The cell-level building blocks of the solvers: the row/column relaxation and its
//! prices, priced candidates, auctions, shortest augmenting paths on the candidates, and
//! a repair pass for words the candidates cannot place ([`cell_solve`]). Memory is the
//! tables plus O(V * k^2) candidate edges; nothing is V x V.

use rayon::prelude::*;

use super::auction;
use super::costs::Costs;
use super::prices::{bin_dual_bound, bin_prices};
use super::sap::{Graph, NONE, Sap};
use super::{AllocError, Elem, Problem, Result, SolveOptions};

/// The row/column relaxation: words into rows of capacity C and, independently, into
/// columns of capacity R (the cell constraint dropped). Its prices rank candidates and
/// warm-start the solvers; its dual value bounds every allocation's cost from below.
pub struct Relaxation {
    /// Row prices alpha [R] and column prices beta [C] (>= 0).
    pub alpha: Vec<f64>,
    pub beta: Vec<f64>,
    /// Bids the two auctions spent.
    pub bids: u64,
    /// sum_w min_i (L_r[w, i] + alpha_i) - C sum alpha + the same for the columns: a
    /// lower bound on the optimum, much tighter than each word's best cell when many
    /// words want the same rows.
    pub bound: f64,
    pub seconds: f64,
}

/// Typical magnitude of a word's best row loss (sets the auctions' eps).
pub(super) fn mean_best_row<P: Costs>(p: &P) -> f64 {
    (0..p.vocab())
        .into_par_iter()
        .map(|w| p.best_row(w).abs())
        .sum::<f64>()
        / p.vocab() as f64
}

/// Prices of the relaxation from two auctions (on a regular sample of the words beyond
/// RELAX_SAMPLE, with proportionally smaller capacities), and its bound over all words.
pub fn relaxation<T: Elem>(p: &Problem<'_, T>) -> Relaxation {
    let t0 = std::time::Instant::now();
    // eps: a small fraction of a typical word's cost; the relaxation is then eps-optimal
    // and its prices are accurate far below the cost differences that matter.
    let eps = 1e-4 * mean_best_row(p) + 1e-9;
    let stride = p.vocab.div_ceil(RELAX_SAMPLE).max(1);
    let sample = p.vocab.div_ceil(stride);
    let scale = sample as f64 / p.vocab as f64;
    let (cap_r, cap_c) = (
        ((p.cols as f64 * scale).ceil() as usize).max(1),
        ((p.rows as f64 * scale).ceil() as usize).max(1),
    );
    let row_cost = |s: usize, i: usize| p.lr(s * stride, i);
    let col_cost = |s: usize, j: usize| p.lc(s * stride, j);
    let ((alpha, b1), (beta, b2)) = rayon::join(
        || bin_prices(sample, p.rows, cap_r, eps, &row_cost),
        || bin_prices(sample, p.cols, cap_c, eps, &col_cost),
    );
    let bound = bin_dual_bound(p.vocab, p.rows, p.cols, &alpha, &|w, i| p.lr(w, i))
        + bin_dual_bound(p.vocab, p.cols, p.rows, &beta, &|w, j| p.lc(w, j));
    Relaxation {
        alpha,
        beta,
        bids: b1 + b2,
        bound,
        seconds: t0.elapsed().as_secs_f64(),
    }
}

/// (priced cost, index) pairs being ranked.
type Ranked = Vec<(f64, u32)>;

/// The k best rows and k best columns of every word under prices: k^2 candidate cells
/// (cell, true cost).
pub(super) fn candidates<T: Elem>(
    p: &Problem<'_, T>,
    alpha: &[f64],
    beta: &[f64],
    k: usize,
) -> Vec<Vec<(u32, f64)>> {
    let (kr, kc) = (k.min(p.rows), k.min(p.cols));
    (0..p.vocab)
        .into_par_iter()
        .map_init(
            || (Vec::with_capacity(p.rows), Vec::with_capacity(p.cols)),
            |(rs, cs): &mut (Ranked, Ranked), w| {
                rs.clear();
                cs.clear();
                rs.extend((0..p.rows).map(|i| (p.lr(w, i) + alpha[i], i as u32)));
                cs.extend((0..p.cols).map(|j| (p.lc(w, j) + beta[j], j as u32)));
                let by = |a: &(f64, u32), b: &(f64, u32)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
                if kr < rs.len() {
                    rs.select_nth_unstable_by(kr - 1, by);
                }
                if kc < cs.len() {
                    cs.select_nth_unstable_by(kc - 1, by);
                }
                let mut out = Vec::with_capacity(kr * kc);
                for &(_, i) in &rs[..kr] {
                    for &(_, j) in &cs[..kc] {
                        let cell = i * p.cols as u32 + j;
                        out.push((cell, p.lr(w, i as usize) + p.lc(w, j as usize)));
                    }
                }
                out
            },
        )
        .collect()
}

/// For every cell, the `m` words that regret it least under the relaxation prices: regret
/// = (L_r[w, i] + alpha_i - min over rows) + (L_c[w, j] + beta_j - min over columns).
/// The words' own best cells leave the cells nobody ranks high out of every list; on a
/// nearly full table some words must take those, and without edges to them the paths
/// cannot reach them. (word, cell, cost) edges; rows split between threads.
pub(super) fn reverse_candidates<T: Elem>(
    p: &Problem<'_, T>,
    alpha: &[f64],
    beta: &[f64],
    m: usize,
) -> Vec<(u32, u32, f64)> {
    let (r, c) = (p.rows, p.cols);
    // Per word, its row and column regrets (f32 is plenty for a ranking).
    let regrets = |n: usize, f: &dyn Fn(usize) -> f64| -> Vec<f32> {
        let v: Vec<f64> = (0..n).map(f).collect();
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        v.into_iter().map(|x| (x - lo) as f32).collect()
    };
    let rr: Vec<f32> = (0..p.vocab)
        .into_par_iter()
        .flat_map_iter(|w| regrets(r, &|i| p.lr(w, i) + alpha[i]))
        .collect();
    let cr: Vec<f32> = (0..p.vocab)
        .into_par_iter()
        .flat_map_iter(|w| regrets(c, &|j| p.lc(w, j) + beta[j]))
        .collect();
    (0..r)
        .into_par_iter()
        .flat_map_iter(|i| {
            // The m best (regret, word) of each cell of row i, sorted ascending.
            let mut best = vec![(f32::INFINITY, u32::MAX); c * m];
            for w in 0..p.vocab {
                let a = rr[w * r + i];
                let crow = &cr[w * c..(w + 1) * c];
                for (j, &b) in crow.iter().enumerate() {
                    let val = a + b;
                    let slot = &mut best[j * m..(j + 1) * m];
                    if val < slot[m - 1].0 {
                        let mut k = m - 1;
                        while k > 0 && slot[k - 1].0 > val {
                            slot[k] = slot[k - 1];
                            k -= 1;
                        }
                        slot[k] = (val, w as u32);
                    }
                }
            }
            best.into_iter()
                .enumerate()
                .filter(|e| e.1.1 != u32::MAX)
                .map(move |(k, (_, w))| {
                    let cell = i * c + k / m;
                    (w, cell as u32, p.cost(w as usize, cell))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Warm potentials from the prices: reduced cost = cost + alpha_i + beta_j.
pub(super) fn warm_potentials<T: Elem>(
    p: &Problem<'_, T>,
    alpha: &[f64],
    beta: &[f64],
) -> Vec<f64> {
    (0..p.cells())
        .map(|c| -(alpha[c / p.cols] + beta[c % p.cols]))
        .collect()
}

/// Words in decreasing order of their best cost: the heavy words are placed first.
pub(super) fn order<P: Costs>(p: &P) -> Vec<u32> {
    let key: Vec<f64> = (0..p.vocab()).into_par_iter().map(|w| p.best(w)).collect();
    let mut o: Vec<u32> = (0..p.vocab() as u32).collect();
    o.sort_by(|&a, &b| key[b as usize].total_cmp(&key[a as usize]).then(a.cmp(&b)));
    o
}

/// The auction on candidate graph `g` from the relaxation prices; returns its outcome and
/// the final cell prices.
pub(super) fn priced_auction<T: Elem>(
    p: &Problem<'_, T>,
    g: &Graph,
    alpha: &[f64],
    beta: &[f64],
) -> (auction::Outcome, Vec<f64>) {
    let mut price: Vec<f64> = warm_potentials(p, alpha, beta)
        .into_iter()
        .map(|v| -v)
        .collect();
    let out = auction_from(p, g, &mut price);
    (out, price)
}

/// The auction on candidate graph `g` from cell prices `price` (updated in place).
pub(super) fn auction_from<T: Elem>(
    p: &Problem<'_, T>,
    g: &Graph,
    price: &mut [f64],
) -> auction::Outcome {
    // A word leaves for the repair pass when its best priced candidate costs more than its
    // worst cost anywhere plus the highest starting price plus a typical word's cost: far
    // beyond any price a feasible set of candidates reaches, yet finite.
    let mut give_up: Vec<f64> = (0..p.vocab).into_par_iter().map(|w| p.worst(w)).collect();
    let mean_cost = give_up.iter().map(|x| x.abs()).sum::<f64>() / p.vocab as f64;
    let top_price = price.iter().fold(0.0f64, |m, &x| m.max(x));
    for g in &mut give_up {
        *g += top_price + mean_cost;
    }
    let eps_final = 1e-6 * mean_cost + 1e-12;
    auction::run(g, price, &give_up, eps_final, 1e-3 * mean_cost)
}

/// Largest vocabulary for the cell-level auction path.
pub(super) const CELL_AUCTION_MAX: usize = 65_536;

/// Free cells offered to each stuck word at first.
const REPAIR_CANDIDATES: usize = 16;
/// Open cells listed per word when its repair candidates are all taken.
const REST_LIST: usize = 64;
/// Taken cells the search for a word's cheapest open cells passes before it scans the
/// whole table, per cell wanted.
const SEARCH_FACTOR: usize = 32;

/// Words the relaxation auction looks at (a regular sample beyond that).
pub(super) const RELAX_SAMPLE: usize = 100_000;

/// Widening rounds for words the candidates cannot place, and the search budget per word.
const WIDEN_ROUNDS: usize = 2;
/// Searches after which a pass whose searches mostly failed counts as congested.
const CONGESTED_AFTER: usize = 1024;
const MAX_POPS: u64 = 4096;
const WIDEN_WORK: u64 = 512;

/// Passes after the first that add each word's best cells under the last prices, and how
/// many cells each word gets.
const REFINE_ROUNDS: usize = 4;
const REFINE_CELLS: usize = 8;
const REFINE_MIN_GAIN: f64 = 1e-4;
const REFINE_MAX_SCAN: f64 = 4e9;

/// Words each cell of a nearly full table adds to the candidates.
const REVERSE_WORDS: usize = 2;

/// Default candidates per side: more for small tables (cheap), fewer for huge ones.
fn default_k(v: usize) -> usize {
    if v <= 20_000 {
        8
    } else if v <= 200_000 {
        6
    } else {
        5
    }
}

/// One pass on candidate graph `g` from cell prices `price` (updated): the auction,
/// shortest augmenting paths on the candidates (widening them for words they cannot
/// place), and the repair pass.
struct Pass {
    x: Vec<u32>,
    /// Cell potentials of the paths' final matching (prices = -v).
    v: Vec<f64>,
    stats: serde_json::Value,
}

fn pass<T: Elem>(p: &Problem<'_, T>, g: &mut Graph, price: &mut [f64]) -> Result<Pass> {
    let t0 = std::time::Instant::now();
    let out = auction_from(p, g, price);
    let t_auction = t0.elapsed().as_secs_f64();
    // Polish: shortest augmenting paths on the candidates make the assignment optimal for
    // the candidate graph. On (nearly) square tables they start from the auction's prices
    // and assignment (nearly optimal duals: short paths); otherwise from zero potentials,
    // because an empty cell must end with potential 0.
    let empty = p.cells() - p.vocab;
    let mut x = out.x;
    let mut unplaced = 0usize;
    let mut widened = 0usize;
    let pops;
    let v;
    {
        let warm = empty * 1000 <= p.cells();
        let v0 = if warm {
            price.iter().map(|&q| -q).collect()
        } else {
            vec![0.0; p.cells()]
        };
        let mut sap = Sap::new(p.vocab, v0);
        let mut left = sap.adopt(g, &x);
        // Words without a short path get their best cells under the current potentials
        // (over the whole table) and their best free cells, then try again with a larger
        // search budget; the last round searches without limit.
        // A widened round runs only while its worst-case work (words x search budget)
        // stays within WIDEN_WORK pops per word of the vocabulary: many stuck words mean
        // a congested table where long searches mostly fail, and the repair pass does
        // about as well at a fraction of the time.
        for round in 0..WIDEN_ROUNDS {
            let budget = MAX_POPS << (3 * round);
            let mut failed = Vec::new();
            // A congested table (nearly uniform losses: every word wants the same few
            // cells) makes most searches fail at any budget; once most of them have,
            // the rest get a small one and the repair pass places the words they miss,
            // in a fraction of the time.
            let mut b = budget;
            for (tried, w) in left.into_iter().enumerate() {
                if !sap.augment_capped(g, w as usize, b) {
                    failed.push(w);
                }
                if tried + 1 >= CONGESTED_AFTER && 2 * failed.len() > tried + 1 {
                    b = budget.min(MAX_POPS / 16);
                }
            }
            // The next round would not run (too much work): no widening for it either.
            let next_budget = MAX_POPS << (3 * (round + 1));
            let too_much = failed.len() as u64 * next_budget > WIDEN_WORK * p.vocab as u64;
            if failed.is_empty() || round + 1 == WIDEN_ROUNDS || too_much {
                unplaced = failed.len();
                break;
            }
            widened += failed.len();
            let free: Vec<u32> = (0..p.cells() as u32)
                .filter(|&c| sap.y[c as usize] == NONE)
                .collect();
            let extra: Vec<(u32, u32, f64)> = failed
                .par_iter()
                .flat_map_iter(|&w| {
                    let w = w as usize;
                    let mut best: Vec<(f64, u32)> = (0..p.cells())
                        .map(|c| (p.cost(w, c) - sap.v[c], c as u32))
                        .collect();
                    let m = 8.min(best.len());
                    best.select_nth_unstable_by(m - 1, |a, b| a.0.total_cmp(&b.0));
                    best.truncate(m);
                    let mut fr: Vec<(f64, u32)> =
                        free.iter().map(|&c| (p.cost(w, c as usize), c)).collect();
                    let m = 4.min(fr.len());
                    if m > 0 {
                        fr.select_nth_unstable_by(m - 1, |a, b| a.0.total_cmp(&b.0));
                        fr.truncate(m);
                    }
                    best.into_iter()
                        .chain(fr)
                        .map(move |(_, c)| (w as u32, c, p.cost(w, c as usize)))
                })
                .collect();
            *g = g.with_extra(extra);
            left = failed;
        }
        pops = sap.pops;
        x = sap.x;
        v = sap.v;
    }
    let t_polish = t0.elapsed().as_secs_f64();
    let repaired = repair(p, &mut x)?;
    Ok(Pass {
        x,
        v,
        stats: serde_json::json!({
            "auction_bids": out.bids,
            "auction_phases": out.phases,
            "unplaced_after_paths": unplaced,
            "words_widened": widened,
            "cells_popped": pops,
            "repaired_words": repaired,
            "seconds_auction": t_auction,
            "seconds_paths": t_polish - t_auction,
            "seconds_repair": t0.elapsed().as_secs_f64() - t_polish,
        }),
    })
}

/// The repair pass: every word still without a cell (NONE in `x`) gets one of the free
/// cells; returns how many words it placed.
fn repair<T: Elem>(p: &Problem<'_, T>, x: &mut [u32]) -> Result<usize> {
    let mut taken = vec![false; p.cells()];
    for &c in x.iter() {
        if c != NONE {
            taken[c as usize] = true;
        }
    }
    // Repair: every stuck word gets its REPAIR_CANDIDATES cheapest free cells and
    // shortest augmenting paths (from zero potentials) place as many as those cells hold;
    // the rest take their cheapest remaining free cell, heaviest words first.
    let stuck: Vec<usize> = (0..p.vocab).filter(|&w| x[w] == NONE).collect();
    if !stuck.is_empty() {
        let free: Vec<u32> = (0..p.cells() as u32)
            .filter(|&c| !taken[c as usize])
            .collect();
        if free.len() < stuck.len() {
            return Err(AllocError::Solver(
                "fewer free cells than unplaced words".into(),
            ));
        }
        // Free index of every cell (NONE: taken).
        let mut slot = vec![NONE; p.cells()];
        for (k, &c) in free.iter().enumerate() {
            slot[c as usize] = k as u32;
        }
        let mut lists: Vec<Vec<(u32, f64)>> = stuck
            .par_iter()
            .map(|&w| {
                cheapest_open(p, w, REPAIR_CANDIDATES, p.cells() - free.len(), &|c| {
                    slot[c]
                })
            })
            .collect();
        let lg = Graph::new(lists.clone(), 0, free.len());
        let mut sap = Sap::new(stuck.len(), vec![0.0; free.len()]);
        let mut rest = Vec::new();
        for k in 0..stuck.len() {
            if !sap.augment_capped(&lg, k, MAX_POPS) {
                rest.push(k);
            }
        }
        let mut used = vec![false; free.len()];
        for (k, &w) in stuck.iter().enumerate() {
            if sap.x[k] != NONE {
                x[w] = free[sap.x[k] as usize];
                used[sap.x[k] as usize] = true;
            }
        }
        rest.sort_by(|&a, &b| p.cost(stuck[b], 0).total_cmp(&p.cost(stuck[a], 0)));
        // Each word's list holds the cheapest cells that were open when it was made,
        // cheapest first; cells are only ever taken, so the first one still open is the
        // cheapest open cell of all. A word whose list is all taken gets a new one from
        // the open cells: O(free cells) then, not for every word.
        let open_list = |w: usize, used: &[bool]| -> Vec<(u32, f64)> {
            let taken = p.cells() - free.len() + used.iter().filter(|&&u| u).count();
            cheapest_open(p, w, REST_LIST, taken, &|c| {
                let k = slot[c];
                if k != NONE && !used[k as usize] {
                    k
                } else {
                    NONE
                }
            })
        };
        for k in rest {
            let w = stuck[k];
            let mut list = std::mem::take(&mut lists[k]);
            loop {
                list.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
                if let Some(&(i, _)) = list.iter().find(|e| !used[e.0 as usize]) {
                    used[i as usize] = true;
                    x[w] = free[i as usize];
                    break;
                }
                list = open_list(w, &used);
                if list.is_empty() {
                    return Err(AllocError::Solver("no free cell left for a word".into()));
                }
            }
        }
    }
    Ok(stuck.len())
}

/// Word `w`'s `m` cheapest open cells as (`open(cell)`, cost), cheapest first; `open`
/// gives a cell's index among the open cells, NONE for a taken one. The cost being
/// separable, cells come in increasing cost from the word's rows and columns sorted by
/// their losses (a frontier over row rank x column rank), so a table with free cells
/// near the word's best ones is searched in O(R log R + C log C), not O(R * C). With
/// `taken` cells taken the frontier meets at most `taken` of them before the m-th open
/// one; where that could be more than an eighth of the table it stops after
/// `SEARCH_FACTOR * m` taken cells and scans the whole table instead.
fn cheapest_open<T: Elem>(
    p: &Problem<'_, T>,
    w: usize,
    m: usize,
    taken: usize,
    open: &(dyn Fn(usize) -> u32 + Sync),
) -> Vec<(u32, f64)> {
    let limit = if taken + m <= p.cells() / 8 {
        taken + m
    } else {
        SEARCH_FACTOR * m
    };
    let by = |a: &(f64, u32), b: &(f64, u32)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
    let mut rows: Vec<(f64, u32)> = (0..p.rows).map(|i| (p.lr(w, i), i as u32)).collect();
    let mut cols: Vec<(f64, u32)> = (0..p.cols).map(|j| (p.lc(w, j), j as u32)).collect();
    rows.sort_unstable_by(by);
    cols.sort_unstable_by(by);
    let mut heap = std::collections::BinaryHeap::new();
    heap.push(std::cmp::Reverse((
        Ordered(rows[0].0 + cols[0].0),
        0u32,
        0u32,
    )));
    let mut out = Vec::with_capacity(m);
    let mut seen = 0usize;
    while let Some(std::cmp::Reverse((_, a, b))) = heap.pop() {
        let (a, b) = (a as usize, b as usize);
        let cell = rows[a].1 as usize * p.cols + cols[b].1 as usize;
        let k = open(cell);
        if k != NONE {
            out.push((k, p.cost(w, cell)));
            if out.len() == m {
                return out;
            }
        }
        seen += 1;
        if seen > limit {
            break;
        }
        if b == 0 && a + 1 < rows.len() {
            heap.push(std::cmp::Reverse((
                Ordered(rows[a + 1].0 + cols[0].0),
                a as u32 + 1,
                0,
            )));
        }
        if b + 1 < cols.len() {
            heap.push(std::cmp::Reverse((
                Ordered(rows[a].0 + cols[b + 1].0),
                a as u32,
                b as u32 + 1,
            )));
        }
    }
    if out.len() < m && seen > limit {
        // Crowded near the word's best cells: every open cell, the m cheapest.
        let mut all: Vec<(f64, u32)> = (0..p.cells())
            .filter_map(|c| {
                let k = open(c);
                (k != NONE).then(|| (p.cost(w, c), k))
            })
            .collect();
        let mm = m.min(all.len());
        if mm > 0 {
            all.select_nth_unstable_by(mm - 1, by);
        }
        all.truncate(mm);
        all.sort_unstable_by(by);
        return all.into_iter().map(|(c, k)| (k, c)).collect();
    }
    out
}

/// Each word's `m` cheapest cells over the whole table under cell prices `price`:
/// (word, cell, cost) edges. One pass over V x R*C priced costs, row by row.
fn priced_best_cells<T: Elem>(p: &Problem<'_, T>, price: &[f64], m: usize) -> Vec<(u32, u32, f64)> {
    let (r, c) = (p.rows, p.cols);
    (0..p.vocab)
        .into_par_iter()
        .flat_map_iter(|w| {
            let lc: Vec<f64> = (0..c).map(|j| p.lc(w, j)).collect();
            // Max-heap of the m best (value, cell) so far.
            let mut top: std::collections::BinaryHeap<(Ordered, u32)> =
                std::collections::BinaryHeap::with_capacity(m + 1);
            for i in 0..r {
                let base = p.lr(w, i);
                let prow = &price[i * c..(i + 1) * c];
                for (j, (&a, &q)) in lc.iter().zip(prow).enumerate() {
                    let val = base + a + q;
                    if top.len() < m {
                        top.push((Ordered(val), (i * c + j) as u32));
                    } else if val < top.peek().map_or(f64::INFINITY, |t| t.0.0) {
                        top.pop();
                        top.push((Ordered(val), (i * c + j) as u32));
                    }
                }
            }
            top.into_iter()
                .map(move |(_, cell)| (w as u32, cell, p.cost(w, cell as usize)))
        })
        .collect()
}

#[derive(Clone, Copy, PartialEq)]
struct Ordered(f64);
impl Eq for Ordered {}
impl PartialOrd for Ordered {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Ordered {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0)
    }
}

/// The cell-level path: candidates, passes of auction and augmenting paths, repair.
pub(super) fn cell_solve<T: Elem>(
    p: &Problem<'_, T>,
    rel: &Relaxation,
    opts: &SolveOptions,
) -> Result<(Vec<u32>, serde_json::Value)> {
    let t0 = std::time::Instant::now();
    let k = if opts.candidates > 0 {
        opts.candidates
    } else {
        default_k(p.vocab)
    };
    let (alpha, beta, bids) = (&rel.alpha, &rel.beta, rel.bids);
    let t_prices = rel.seconds;
    let mut g = Graph::new(candidates(p, alpha, beta, k), 0, p.cells());
    // Nearly full tables: also the words that regret each cell least.
    let congested = (p.cells() - p.vocab) * 20 <= p.cells();
    if congested {
        g = g.with_extra(reverse_candidates(p, alpha, beta, REVERSE_WORDS));
    }
    let t_cand = t_prices + t0.elapsed().as_secs_f64();
    tracing::info!(
        seconds = t_cand,
        edges = g.edges(),
        "allocation: candidates"
    );
    let mut price: Vec<f64> = warm_potentials(p, alpha, beta)
        .into_iter()
        .map(|v| -v)
        .collect();
    // Rounds: after each pass, every word also gets its best cells under the prices the
    // pass ended with (its cell potentials, which are not separable like the
    // relaxation's) and the next pass starts from those prices; the cheapest pass wins.
    // Refinement stops when a pass gains less than REFINE_MIN_GAIN, and is skipped on
    // congested tables (more than 1 % of the words left to the repair pass), where its
    // passes are slow and gain little.
    let mut best: Option<(f64, Vec<u32>)> = None;
    let mut passes = Vec::new();
    let mut last = f64::INFINITY;
    // A refinement scans all V x R*C priced costs: only while that stays affordable.
    let rounds = if (p.vocab as f64) * (p.cells() as f64) <= REFINE_MAX_SCAN {
        REFINE_ROUNDS
    } else {
        0
    };
    for round in 0..=rounds {
        let t = std::time::Instant::now();
        if round > 0 {
            let extra = priced_best_cells(p, &price, REFINE_CELLS);
            g = g.with_extra(extra);
        }
        let t_refine = t.elapsed().as_secs_f64();
        let ps = pass(p, &mut g, &mut price)?;
        let cost = p.total(&ps.x);
        tracing::info!(
            round,
            cost,
            edges = g.edges(),
            seconds = t.elapsed().as_secs_f64(),
            "allocation: pass"
        );
        let repaired = ps.stats["repaired_words"].as_u64().unwrap_or(0) as usize;
        let mut st = ps.stats;
        if let Some(o) = st.as_object_mut() {
            o.insert("cost".into(), cost.into());
            o.insert("edges".into(), g.edges().into());
            o.insert("seconds_candidates".into(), t_refine.into());
        }
        passes.push(st);
        if best.as_ref().is_none_or(|b| cost < b.0) {
            best = Some((cost, ps.x));
        }
        price = ps.v.iter().map(|&v| -v).collect();
        let gain = (last - cost) / cost.abs().max(1e-300);
        last = cost;
        if 100 * repaired > p.vocab || (round > 0 && gain < REFINE_MIN_GAIN) {
            break;
        }
    }
    let x = best.map(|b| b.1).unwrap_or_default();
    let stats = serde_json::json!({
        "reverse_candidates": congested,
        "candidates_per_side": k,
        "relaxation_bids": bids,
        "seconds_prices": t_prices,
        "seconds_candidates": t_cand - t_prices,
        "passes": passes,
    });
    Ok((x, stats))
}
