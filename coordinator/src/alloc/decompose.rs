//! Rows, then columns: the row relaxation's auction assigns every word a row (rows hold
//! C words; exact for the problem without column conflicts), then each row's words get
//! distinct columns by an exact assignment on that row alone (rows in parallel). Memory
//! and time grow linearly with V; this is the scalable solver's path for very large
//! tables, where the cell-level auction would spend most of its bids on price wars.

use rayon::prelude::*;

use super::prices::bin_auction_warm;
use super::sap::{Graph, Sap};
use super::{AllocError, Elem, Problem, Result};

pub fn solve<T: Elem>(
    p: &Problem<'_, T>,
    eps: f64,
    k: usize,
) -> Result<(Vec<u32>, serde_json::Value)> {
    let t0 = std::time::Instant::now();
    // Column prices from the (sampled) relaxation rank each word's columns; the rows come
    // from a full auction over all words (a warm start from sampled prices bids more).
    let (_, beta, _) = super::scalable::relaxation_prices(p);
    let row_cost = |w: usize, out: &mut [f64]| {
        for (i, o) in out.iter_mut().enumerate() {
            *o = p.lr(w, i);
        }
    };
    let (_, row_of, bids) = bin_auction_warm(p.vocab, p.rows, p.cols, eps, &row_cost, None);
    let t_rows = t0.elapsed().as_secs_f64();
    let mut members: Vec<Vec<u32>> = vec![Vec::new(); p.rows];
    for (w, &r) in row_of.iter().enumerate() {
        if r as usize >= p.rows {
            return Err(AllocError::Solver(format!("word {w} got no row")));
        }
        members[r as usize].push(w as u32);
    }
    // Columns within each row: candidates = the word's k best columns; words they cannot
    // place get every column of the row.
    let placed: Vec<Vec<(u32, u32)>> = members
        .par_iter()
        .enumerate()
        .map(|(i, ws)| {
            let kk = k.min(p.cols);
            let lists: Vec<Vec<(u32, f64)>> = ws
                .iter()
                .map(|&w| {
                    let mut cs: Vec<(f64, u32)> = (0..p.cols)
                        .map(|j| (p.lc(w as usize, j) + beta[j], j as u32))
                        .collect();
                    cs.select_nth_unstable_by(kk - 1, |a, b| a.0.total_cmp(&b.0));
                    cs.truncate(kk);
                    cs.into_iter()
                        .map(|(_, j)| (j, p.lc(w as usize, j as usize)))
                        .collect()
                })
                .collect();
            let mut g = Graph::new(lists, 0, p.cols);
            // A full row is a square problem: the column prices are a valid warm start.
            let v0 = if ws.len() == p.cols {
                beta.iter().map(|b| -b).collect()
            } else {
                vec![0.0; p.cols]
            };
            let mut sap = Sap::new(ws.len(), v0);
            let mut todo: Vec<usize> = (0..ws.len()).collect();
            let mut round = 0u32;
            while !todo.is_empty() {
                round += 1;
                let mut failed = Vec::new();
                for &k in &todo {
                    if !sap.augment(&g, k) {
                        failed.push(k);
                    }
                }
                if failed.is_empty() {
                    break;
                }
                // Failed words: their best columns under the row's current potentials, 4k
                // of them and four times more each round (all columns at the end).
                let extra = failed
                    .iter()
                    .flat_map(|&k| {
                        let w = ws[k] as usize;
                        let mut cs: Vec<(f64, u32)> = (0..p.cols)
                            .map(|j| (p.lc(w, j) - sap.v[j], j as u32))
                            .collect();
                        let m = (4 * kk)
                            .saturating_mul(1 << (2 * round.min(8)))
                            .min(cs.len());
                        cs.select_nth_unstable_by(m - 1, |a, b| a.0.total_cmp(&b.0));
                        cs.truncate(m);
                        cs.into_iter()
                            .map(move |(_, j)| (k as u32, j, p.lc(w, j as usize)))
                    })
                    .collect();
                g = g.with_extra(extra);
                todo = failed;
            }
            ws.iter()
                .enumerate()
                .map(|(k, &w)| (w, (i * p.cols) as u32 + sap.x[k]))
                .collect()
        })
        .collect();
    let mut cells = vec![0u32; p.vocab];
    for row in placed {
        for (w, c) in row {
            cells[w as usize] = c;
        }
    }
    let stats = serde_json::json!({
        "method": "rows then columns",
        "row_auction_bids": bids,
        "seconds_rows": t_rows,
        "seconds_columns": t0.elapsed().as_secs_f64() - t_rows,
    });
    Ok((cells, stats))
}
