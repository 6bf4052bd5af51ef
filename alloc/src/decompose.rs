//! Heavy words first, then rows, then columns: the words with the most to lose (the
//! `heavy` words of largest best cost) get cells from the cell-level solver on the
//! whole table, as if alone; the row relaxation's auction gives every other word a row
//! among the rows' remaining slots (exact for the problem without column conflicts);
//! then each row's words get distinct free columns of that row by an exact assignment on
//! that row alone (rows in parallel). Memory and time grow linearly with V; this is the
//! scalable solver's path for very large tables, where the cell-level auction over all
//! words would spend most of its bids on price wars.
//!
//! Why the heavy words go first: rows chosen for their row losses alone put words that
//! want the same column in the same row; for the light words the per-row assignment
//! absorbs that at little cost, for the heaviest words it costs far more than the whole
//! tail gains.

use rayon::prelude::*;

use super::cells;
use super::costs::{Costs, FreeCols};
use super::sap::{Graph, NONE, Sap};
use super::{AllocError, Problem, Result, SolveOptions};

/// `beta`: the column prices of the relaxation (they rank each row's free columns).
pub fn solve<P: Costs>(
    p: &P,
    beta: &[f64],
    eps: f64,
    k: usize,
    heavy: usize,
) -> Result<(Vec<u32>, serde_json::Value)> {
    let t0 = std::time::Instant::now();
    let (r, c) = (p.rows(), p.cols());
    let mut cells = vec![u32::MAX; p.vocab()];
    let mut taken = vec![false; p.cells()];
    let ord = cells::order(p);
    let h = heavy.min(p.vocab());
    let mut heavy_stats = serde_json::Value::Null;
    if h > 0 {
        let (mut lr, mut lc) = (Vec::with_capacity(h * r), Vec::with_capacity(h * c));
        for &w in &ord[..h] {
            p.tables_of(w as usize, &mut lr, &mut lc);
        }
        let sub = Problem::new(h, r, c, &lr, &lc)?;
        let sub_rel = cells::relaxation(&sub);
        let (sub_cells, stats) = cells::cell_solve(&sub, &sub_rel, &SolveOptions::default())?;
        for (&w, &cell) in ord[..h].iter().zip(&sub_cells) {
            cells[w as usize] = cell;
            taken[cell as usize] = true;
        }
        heavy_stats = stats;
    }
    let t_heavy = t0.elapsed().as_secs_f64();
    tracing::info!(seconds = t_heavy, words = h, "allocation: heavy words");
    // Rows for the rest, among the slots the heavy words left.
    let tail = &ord[h..];
    let caps: Vec<usize> = (0..r)
        .map(|i| taken[i * c..(i + 1) * c].iter().filter(|&&t| !t).count())
        .collect();
    let rows = p.row_auction(tail, &caps, eps);
    let bids = rows.bids;
    let t_rows = t0.elapsed().as_secs_f64();
    tracing::info!(
        seconds = t_rows - t_heavy,
        bids,
        scans = rows.scans,
        "allocation: rows"
    );
    let mut members: Vec<Vec<u32>> = vec![Vec::new(); r];
    for (t, &i) in rows.bin_of.iter().enumerate() {
        if i as usize >= r {
            return Err(AllocError::Solver(format!("word {} got no row", tail[t])));
        }
        members[i as usize].push(tail[t]);
    }
    // Columns within each row, among the row's free columns (local indices): candidates
    // = the word's k best columns under the column prices; words they cannot place get
    // more of the row's columns each round (all of them at the end).
    let placed: Vec<Vec<(u32, u32)>> = members
        .par_iter()
        .enumerate()
        .map(|(i, ws)| {
            let col_price = |l: u32, f: &[u32]| beta[f[l as usize] as usize];
            let free_cols: Vec<u32> = (0..c as u32)
                .filter(|&j| !taken[i * c + j as usize])
                .collect();
            let mut free = FreeCols::new(free_cols.clone(), c, &|l| col_price(l, &free_cols));
            if let Some(local) = sparse_columns(p, ws, &free) {
                return ws
                    .iter()
                    .zip(local)
                    .map(|(&w, l)| (w, (i * c) as u32 + free_cols[l as usize]))
                    .collect();
            }
            let nf = free.len();
            let lc = |w: u32, l: u32| p.lc(w as usize, free_cols[l as usize] as usize);
            let kk = k.min(nf);
            let lists: Vec<Vec<(u32, f64)>> = ws
                .iter()
                .map(|&w| {
                    p.ranked_cols(w as usize, &free, kk, &|l| col_price(l, &free_cols))
                        .into_iter()
                        .map(|l| (l, lc(w, l)))
                        .collect()
                })
                .collect();
            let mut g = Graph::new(lists, 0, nf);
            // A full row is a square problem: the column prices are a valid warm start.
            let v0 = if ws.len() == nf {
                free_cols.iter().map(|&j| -beta[j as usize]).collect()
            } else {
                vec![0.0; nf]
            };
            let mut sap = Sap::new(ws.len(), v0);
            let mut todo: Vec<usize> = (0..ws.len()).collect();
            let mut round = 0u32;
            while !todo.is_empty() {
                round += 1;
                let mut failed = Vec::new();
                for &t in &todo {
                    if !sap.augment(&g, t) {
                        failed.push(t);
                    }
                }
                if failed.is_empty() {
                    break;
                }
                let m = (4 * kk).saturating_mul(1 << (2 * round.min(8))).min(nf);
                let v = &sap.v;
                free.rank(&|l| -v[l as usize]);
                let extra = failed
                    .iter()
                    .flat_map(|&t| {
                        let w = ws[t];
                        p.ranked_cols(w as usize, &free, m, &|l| -v[l as usize])
                            .into_iter()
                            .map(move |l| (t as u32, l, lc(w, l)))
                    })
                    .collect();
                g = g.with_extra(extra);
                todo = failed;
            }
            ws.iter()
                .enumerate()
                .map(|(t, &w)| (w, (i * c) as u32 + free_cols[sap.x[t] as usize]))
                .collect()
        })
        .collect();
    for row in placed {
        for (w, cell) in row {
            cells[w as usize] = cell;
        }
    }
    let t_cols = t0.elapsed().as_secs_f64();
    let stats = serde_json::json!({
        "method": "heavy words by cells, then rows, then columns",
        "heavy_words": h,
        "heavy": heavy_stats,
        "row_auction_bids": bids,
        "row_auction_scans": rows.scans,
        "seconds_heavy": t_heavy,
        "seconds_rows": t_rows - t_heavy,
        "seconds_columns": t_cols - t_rows,
    });
    Ok((cells, stats))
}

/// One row's columns on sparse tables (local indices of `free`, per word of `ws`), exact
/// for the tables' costs: every non-candidate column costs a word the same (its tail), so
/// its edges are its free candidate columns and one private cell at the tail's cost, and
/// the assignment always exists. The words matched to their private cell then take the
/// free columns left: the words of largest tail first, the columns of highest price
/// (those most words want) first. `None` for dense tables.
pub(crate) fn sparse_columns<P: Costs>(p: &P, ws: &[u32], free: &FreeCols) -> Option<Vec<u32>> {
    let (n, nf) = (ws.len(), free.len());
    let mut lists = Vec::with_capacity(n);
    let mut tails = Vec::with_capacity(n);
    for (t, &w) in ws.iter().enumerate() {
        let (ids, ls, tail) = p.col_candidates(w as usize)?;
        let mut l: Vec<(u32, f64)> = ids
            .iter()
            .zip(ls)
            .filter_map(|(&j, &x)| {
                let loc = free.local[j as usize];
                (loc != NONE).then_some((loc, f64::from(x)))
            })
            .collect();
        if tail.is_finite() {
            l.push(((nf + t) as u32, tail));
        }
        lists.push(l);
        tails.push(tail);
    }
    let g = Graph::new(lists, 0, nf + n);
    let mut sap = Sap::new(n, vec![0.0; nf + n]);
    for t in 0..n {
        if !sap.augment(&g, t) {
            // Only where a word with every column a candidate meets a full row: the
            // general path decides.
            return None;
        }
    }
    let mut used = vec![false; nf];
    for &x in &sap.x {
        if (x as usize) < nf {
            used[x as usize] = true;
        }
    }
    let mut spare = free.by_price.iter().rev().filter(|&&l| !used[l as usize]);
    let mut left: Vec<usize> = (0..n).filter(|&t| sap.x[t] as usize >= nf).collect();
    left.sort_by(|&a, &b| tails[b].total_cmp(&tails[a]).then(a.cmp(&b)));
    let mut x = sap.x;
    for t in left {
        x[t] = *spare.next()?;
    }
    Some(x)
}
