//! The exact solver. The rectangular problem (V words, R*C >= V cells) is padded to a
//! square one with R*C - V zero-cost words that may take any cell; then
//! 1. shortest augmenting paths on priced candidates (as the scalable solver, more of
//!    them) give an optimal matching *of the candidate graph* with potentials v;
//! 2. the certificate: with u_w = c(w, x_w) - v[x_w], the matching is optimal for the
//!    full problem iff c(w, cell) - v[cell] - u_w >= 0 for all V x R*C pairs (LP duality).
//!    The check is one pass over all pairs, cheap with the separable cost
//!    (L_r[w, i] + L_c[w, j] - v[i, j]); pairs that violate it are added to the graph,
//!    their words are unmatched and re-augmented, and the check runs again.
//!
//! The final dual objective sum u + sum v equals the cost: the optimality certificate.

use rayon::prelude::*;

use super::cells::{Relaxation, candidates, order, priced_auction};
use super::sap::{Graph, Sap};
use super::{AllocError, Elem, Problem, Result, SolveOptions};

/// Violations kept per word and round.
const PER_WORD: usize = 8;
/// The most candidate edges per word the exact solver holds (its memory bound: 16 bytes
/// an edge); tables so tied that the certificate needs more are refused, the scalable
/// solver solves them.
pub const MAX_EDGES_PER_WORD: usize = 1024;

/// Pairs whose reduced cost is below -tol: (word, cell, cost), the most negative first per word.
fn certificate<T: Elem>(p: &Problem<'_, T>, sap: &Sap, tol: f64) -> Vec<(u32, u32, f64)> {
    let (r, c) = (p.rows, p.cols);
    (0..p.vocab)
        .into_par_iter()
        .flat_map_iter(|w| {
            let uw = sap.u(w);
            let mut worst: Vec<(f64, u32)> = Vec::new();
            let lc: Vec<f64> = (0..c).map(|j| p.lc(w, j)).collect();
            for i in 0..r {
                let base = p.lr(w, i) - uw;
                let vrow = &sap.v[i * c..(i + 1) * c];
                let mut m = f64::INFINITY;
                for (a, b) in lc.iter().zip(vrow) {
                    m = m.min(a - b);
                }
                if base + m < -tol {
                    for (j, (a, b)) in lc.iter().zip(vrow).enumerate() {
                        let red = base + a - b;
                        if red < -tol {
                            worst.push((red, (i * c + j) as u32));
                        }
                    }
                }
            }
            if worst.len() > PER_WORD {
                worst.select_nth_unstable_by(PER_WORD - 1, |a, b| a.0.total_cmp(&b.0));
                worst.truncate(PER_WORD);
            }
            worst
                .into_iter()
                .map(move |(_, cell)| (w as u32, cell, p.cost(w, cell as usize)))
        })
        .collect()
}

/// Refuse a graph beyond the memory bound.
fn check_edges(g: &Graph, vocab: usize) -> Result<()> {
    if g.edges() > MAX_EDGES_PER_WORD * vocab.max(1) {
        return Err(AllocError::Solver(format!(
            "exact: the tables are so tied that the optimality certificate needs more than \
             {MAX_EDGES_PER_WORD} candidate cells per word (its memory bound); the scalable \
             solver handles such tables"
        )));
    }
    Ok(())
}

/// The `m` cells of least reduced cost for word `w` over the whole table, among those
/// not in `have` (its edges already: on tied tables the cheapest cells would be the
/// same ones again, and the widening would never end).
fn best_cells<T: Elem>(
    p: &Problem<'_, T>,
    v: &[f64],
    w: usize,
    m: usize,
    have: &[u32],
) -> Vec<(u32, u32, f64)> {
    let mut have = have.to_vec();
    have.sort_unstable();
    let mut all: Vec<(f64, u32)> = (0..p.cells())
        .filter(|&cell| have.binary_search(&(cell as u32)).is_err())
        .map(|cell| (p.cost(w, cell) - v[cell], cell as u32))
        .collect();
    if all.is_empty() {
        return Vec::new();
    }
    let m = m.min(all.len());
    all.select_nth_unstable_by(m - 1, |a, b| a.0.total_cmp(&b.0));
    // A new vector of m edges (an in-place collect would keep all cells' capacity).
    all[..m]
        .iter()
        .map(|&(_, cell)| (w as u32, cell, p.cost(w, cell as usize)))
        .collect()
}

pub fn solve<T: Elem>(
    p: &Problem<'_, T>,
    rel: &Relaxation,
    opts: &SolveOptions,
) -> Result<(Vec<u32>, Option<f64>, serde_json::Value)> {
    let t0 = std::time::Instant::now();
    let n = p.cells();
    let dummies = n - p.vocab;
    if (dummies as u64) * (n as u64) > 400_000_000 {
        return Err(AllocError::Solver(format!(
            "exact: {} empty cells x {n} cells is too large a padding; use the scalable solver",
            dummies
        )));
    }
    let k = if opts.candidates > 0 {
        opts.candidates
    } else {
        16
    };
    let (alpha, beta, bids) = (&rel.alpha, &rel.beta, rel.bids);
    let mut g = Graph::new(candidates(p, alpha, beta, k), dummies, n);
    // Warm start: the auction's prices on the candidates are nearly optimal duals, so
    // most augmenting paths end at the first cell they reach. (The problem is square
    // after padding, so any starting potentials are valid.)
    let (_, price) = priced_auction(
        p,
        &Graph::new(candidates(p, alpha, beta, k.min(8)), 0, n),
        alpha,
        beta,
    );
    let mut sap = Sap::new(g.words(), price.into_iter().map(|x| -x).collect());
    let mut free: Vec<u32> = order(p);
    free.extend(p.vocab as u32..g.words() as u32);
    let scale = (0..p.vocab)
        .map(|w| p.lr(w, 0).abs() + p.lc(w, 0).abs())
        .fold(1.0, f64::max);
    let tol = 1e-9 * scale;
    let (mut rounds, mut added, mut widened) = (0usize, 0usize, 0usize);
    loop {
        // Match every free word; words the candidates cannot place get their best cells
        // under the current potentials and try again.
        while !free.is_empty() {
            let mut failed = Vec::new();
            for w in free.drain(..) {
                if !sap.augment(&g, w as usize) {
                    failed.push(w);
                }
            }
            if failed.is_empty() {
                break;
            }
            widened += failed.len();
            let extra: Vec<(u32, u32, f64)> = failed
                .par_iter()
                .flat_map_iter(|&w| {
                    let w = w as usize;
                    let have = &g.cell[g.start[w]..g.start[w + 1]];
                    best_cells(p, &sap.v, w, 4 * PER_WORD, have)
                })
                .collect();
            g = g.with_extra(extra);
            check_edges(&g, p.vocab)?;
            free = failed;
        }
        let viol = certificate(p, &sap, tol);
        if viol.is_empty() {
            break;
        }
        rounds += 1;
        if rounds > 200 {
            return Err(AllocError::Solver(
                "exact: the certificate did not converge in 200 rounds".into(),
            ));
        }
        added += viol.len();
        let mut words: Vec<u32> = viol.iter().map(|e| e.0).collect();
        words.dedup();
        g = g.with_extra(viol);
        check_edges(&g, p.vocab)?;
        for &w in &words {
            sap.unmatch(w as usize);
        }
        free = words;
    }
    let dual: f64 = (0..g.words()).map(|w| sap.u(w)).sum::<f64>() + sap.v.iter().sum::<f64>();
    let stats = serde_json::json!({
        "candidates_per_side": k,
        "padding_words": dummies,
        "edges": g.edges(),
        "auction_bids": bids,
        "certificate_rounds": rounds,
        "edges_added_by_certificate": added,
        "words_widened": widened,
        "cells_popped": sap.pops,
        "seconds": t0.elapsed().as_secs_f64(),
    });
    let mut cells = sap.x;
    cells.truncate(p.vocab);
    Ok((cells, Some(dual), stats))
}
