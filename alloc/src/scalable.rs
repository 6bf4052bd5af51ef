//! The scalable solver: [`cells::cell_solve`] up to [`cells::CELL_AUCTION_MAX`] words,
//! rows then columns beyond ([`decompose`]), then a local improvement ([`improve`]).

use super::cells::{CELL_AUCTION_MAX, Relaxation, cell_solve, mean_best_row, order};
use super::costs::Costs;
use super::{Elem, Problem, Result, SolveOptions, decompose, improve};

/// Local improvement at the end: best rows and columns per word looked at, and sweeps;
/// fewer on the large-table path, whose tables do not fit the caches.
const IMPROVE_SIDE: usize = 6;
const IMPROVE_SWEEPS: usize = 10;
const IMPROVE_SIDE_LARGE: usize = 2;
const IMPROVE_SWEEPS_LARGE: usize = 2;

pub fn solve<T: Elem>(
    p: &Problem<'_, T>,
    rel: &Relaxation,
    opts: &SolveOptions,
) -> Result<(Vec<u32>, Option<f64>, serde_json::Value)> {
    // Beyond CELL_AUCTION_MAX words the cell-level auction spends its time in price wars
    // and its repair pass grows quadratic in the stuck words: rows-then-columns instead.
    let (x, stats) = if p.vocab > CELL_AUCTION_MAX {
        large(p, &rel.beta)?
    } else {
        let (x, stats) = cell_solve(p, rel, opts)?;
        polish(p, x, stats, IMPROVE_SIDE, IMPROVE_SWEEPS)
    };
    Ok((x, None, stats))
}

/// The large-table path on dense or sparse tables: heavy words by cells, rows, columns
/// ([`decompose`]), then the local improvement; `beta` are the relaxation's column prices.
pub fn large<P: Costs>(p: &P, beta: &[f64]) -> Result<(Vec<u32>, serde_json::Value)> {
    // The heavy words fill at most a third of the table: beyond that the cell-level
    // search slows down (as cells grow scarce) faster than the cost improves.
    let heavy = CELL_AUCTION_MAX.min(p.cells() / 3);
    let (x, stats) = decompose::solve(p, beta, 1e-4 * mean_best_row(p) + 1e-9, 16, heavy)?;
    Ok(polish(
        p,
        x,
        stats,
        IMPROVE_SIDE_LARGE,
        IMPROVE_SWEEPS_LARGE,
    ))
}

/// The local improvement of `x`, its figures added to `stats`.
fn polish<P: Costs>(
    p: &P,
    mut x: Vec<u32>,
    mut stats: serde_json::Value,
    side: usize,
    sweeps: usize,
) -> (Vec<u32>, serde_json::Value) {
    let t = std::time::Instant::now();
    let imp = improve::improve(p, &mut x, &order(p), side, sweeps);
    tracing::info!(
        moves = imp.moves,
        gain = imp.gain,
        sweeps = imp.sweeps,
        seconds = t.elapsed().as_secs_f64(),
        "allocation: local improvement"
    );
    if let Some(o) = stats.as_object_mut() {
        o.insert("improve_moves".into(), imp.moves.into());
        o.insert("improve_gain".into(), imp.gain.into());
        o.insert("improve_sweeps".into(), imp.sweeps.into());
        o.insert("seconds_improve".into(), t.elapsed().as_secs_f64().into());
    }
    (x, stats)
}
