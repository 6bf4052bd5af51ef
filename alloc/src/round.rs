//! The central step of a reallocation round: the loss tables summed over every rank ->
//! a new word -> cell table and what it is predicted to gain. It runs wherever the summed
//! tables are: in the process of a single-rank run, on the coordinator for a distributed
//! one; the ranks then carry their vectors and install the table.
//!
//! - Move cost: keeping a word's row keeps its row vectors, keeping its column the column
//!   vectors, so the cost of moving is separable: a discount of `move_cost` nats per
//!   occurrence on the word's current row and again on its current column.
//! - Keep-if-better: a solver (a heuristic one above all) can return an allocation worse
//!   than where the words are, under the (discounted) tables; the current one then stays.
//! - Report: objective before and after (per word, undiscounted), the lower bound, the
//!   words moved, the solver's own figures.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use lightrnn_kernels::LossTables;

use crate::{AllocError, Problem, Result, SolveOptions, Solver, solve};

/// How a round is solved.
#[derive(Clone, Debug)]
pub struct RoundOptions {
    pub solver: Solver,
    pub solve: SolveOptions,
    /// Nats per occurrence charged for changing a word's row, and again for its column:
    /// only words whose predicted gain exceeds it move (0 = free moves).
    pub move_cost: f64,
}

/// What one reallocation did (its `kind: "realloc"` line in metrics.jsonl). The central
/// step fills the objective and solver figures; the ranks add the measured losses and
/// the table pass's time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Report {
    pub solver: String,
    /// Mean training loss per word under the old allocation (the table pass).
    pub train_loss_before: f64,
    /// sum_w L_r[w, r(w)] + L_c[w, c(w)] per word, old and new allocation.
    pub objective_before: f64,
    pub objective_after: f64,
    /// Per word: sum_w min_i L_r + min_j L_c.
    pub lower_bound: f64,
    pub words_moved: usize,
    /// Measured training loss per word right after the move (when asked for).
    pub train_loss_after: Option<f64>,
    pub seconds_tables: f64,
    pub seconds_solve: f64,
    /// The solver found nothing better than the current allocation, which stays.
    pub kept_current: bool,
    /// The solver's own figures (rounds, candidate edges, ...), with its `cost` and
    /// `dual_bound` on the tables it solved (discounted by the move cost).
    pub stats: serde_json::Value,
}

impl Report {
    /// A report with nothing measured (NaN figures): what a line missing them reads as.
    pub fn unmeasured() -> Self {
        Self {
            solver: String::new(),
            train_loss_before: f64::NAN,
            objective_before: f64::NAN,
            objective_after: f64::NAN,
            lower_bound: f64::NAN,
            words_moved: 0,
            train_loss_after: None,
            seconds_tables: f64::NAN,
            seconds_solve: f64::NAN,
            kept_current: false,
            stats: serde_json::Value::Null,
        }
    }
}

impl Default for Report {
    fn default() -> Self {
        Self::unmeasured()
    }
}

/// The outcome of a round: the new allocation, the word counts the ranks weigh carried
/// vectors by, and the report.
#[derive(Clone, Debug)]
pub struct Reallocation {
    /// word -> cell (row * C + col).
    pub cells: Vec<u32>,
    /// Occurrences of each word as a target in the table pass (all ranks).
    pub counts: Vec<u64>,
    pub report: Report,
}

/// The tables as a [`Problem`] (checked: shapes, finite values).
fn problem(t: &LossTables) -> Result<Problem<'_, f32>> {
    if t.words != (0..t.vocab) {
        return Err(AllocError::Input(format!(
            "loss tables of words {}..{} only, of a vocabulary of {}",
            t.words.start, t.words.end, t.vocab
        )));
    }
    Problem::new(t.vocab, t.rows, t.cols, &t.lr, &t.lc)
        .map_err(|e| AllocError::Input(format!("loss tables: {e}")))
}

/// Solve a round from the summed `tables` and the `current` allocation.
pub fn reallocate(tables: &LossTables, current: &[u32], o: &RoundOptions) -> Result<Reallocation> {
    let t0 = Instant::now();
    let p = problem(tables)?;
    p.check(current)
        .map_err(|e| AllocError::Input(format!("the current allocation: {e}")))?;
    let discounted = (o.move_cost > 0.0).then(|| {
        let mut t = tables.clone();
        for (w, &cell) in current.iter().enumerate() {
            let (i, j) = (cell as usize / t.cols, cell as usize % t.cols);
            let d = (o.move_cost * t.counts[w] as f64) as f32;
            t.lr[w * t.rows + i] -= d;
            t.lc[w * t.cols + j] -= d;
        }
        t
    });
    let solve_on = match &discounted {
        Some(t) => problem(t)?,
        None => p,
    };
    let s = solve(&solve_on, o.solver, &o.solve)?;
    let kept = solve_on.total(&s.cells) >= solve_on.total(current);
    let mut stats = s.stats;
    if let Some(m) = stats.as_object_mut() {
        m.insert("cost".into(), s.cost.into());
        m.insert("dual_bound".into(), s.dual_bound.into());
    }
    let cells = if kept { current.to_vec() } else { s.cells };
    drop(discounted);
    let seconds_solve = t0.elapsed().as_secs_f64();
    let words = tables.counts.iter().sum::<u64>().max(1) as f64;
    let before = p.total(current) / words;
    let report = Report {
        solver: o.solver.name().into(),
        train_loss_before: before,
        objective_before: before,
        objective_after: p.total(&cells) / words,
        lower_bound: p.lower_bound() / words,
        words_moved: current.iter().zip(&cells).filter(|(x, y)| x != y).count(),
        train_loss_after: None,
        seconds_tables: 0.0,
        seconds_solve,
        kept_current: kept,
        stats,
    };
    Ok(Reallocation {
        cells,
        counts: tables.counts.clone(),
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables(v: usize, r: usize, c: usize, seed: u64) -> LossTables {
        let (lr, lc) = crate::testutil::tables(v, r, c, seed);
        LossTables {
            vocab: v,
            rows: r,
            cols: c,
            words: 0..v,
            lr: lr.iter().map(|&x| x as f32).collect(),
            lc: lc.iter().map(|&x| x as f32).collect(),
            counts: (0..v as u64).map(|w| 1 + 100 / (1 + w)).collect(),
        }
    }

    #[test]
    fn a_round_improves_the_objective_and_a_high_move_cost_keeps_the_words() {
        let t = tables(60, 8, 8, 3);
        let current: Vec<u32> = (0..60).collect();
        let opts = RoundOptions {
            solver: Solver::Scalable,
            solve: SolveOptions {
                threads: 2,
                ..Default::default()
            },
            move_cost: 0.0,
        };
        let r = reallocate(&t, &current, &opts).unwrap();
        assert!(!r.report.kept_current && r.report.words_moved > 0);
        assert!(r.report.objective_after < r.report.objective_before);
        assert!(r.report.lower_bound <= r.report.objective_after);
        assert_eq!(r.counts, t.counts);
        assert_eq!(
            r.report.stats["cost"].as_f64().map(f64::is_finite),
            Some(true)
        );
        // Moving costs more than any word can gain: every word stays.
        let stay = RoundOptions {
            move_cost: 1e6,
            ..opts.clone()
        };
        let r = reallocate(&t, &current, &stay).unwrap();
        assert_eq!(r.cells, current);
        assert_eq!(r.report.words_moved, 0);
        assert_eq!(r.report.objective_after, r.report.objective_before);
        // A current allocation that is not one is refused.
        let mut bad = current.clone();
        bad[1] = 0;
        let e = reallocate(&t, &bad, &opts).unwrap_err().to_string();
        assert!(e.contains("current allocation"), "{e}");
    }
}
