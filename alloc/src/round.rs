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

use crate::sparse::{SparseProblem, SparseTables, solve_sparse};
use crate::{AllocError, Problem, Result, SolveOptions, Solver, solve};

/// An f64 that JSON may hold as null (how serde_json writes NaN, the "not measured" of
/// our figures): NaN. For `#[serde(deserialize_with = "nan_if_null")]`.
pub fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

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
    #[serde(deserialize_with = "nan_if_null")]
    pub train_loss_before: f64,
    /// sum_w L_r[w, r(w)] + L_c[w, c(w)] per word, old and new allocation.
    #[serde(deserialize_with = "nan_if_null")]
    pub objective_before: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub objective_after: f64,
    /// Per word: sum_w min_i L_r + min_j L_c.
    #[serde(deserialize_with = "nan_if_null")]
    pub lower_bound: f64,
    pub words_moved: usize,
    /// Measured training loss per word right after the move (when asked for).
    pub train_loss_after: Option<f64>,
    #[serde(deserialize_with = "nan_if_null")]
    pub seconds_tables: f64,
    #[serde(deserialize_with = "nan_if_null")]
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

/// The discount of a word that keeps its row (and again its column): `move_cost` nats
/// per occurrence, in the tables' precision.
fn credit(move_cost: f64, count: u64) -> f32 {
    (move_cost * count as f64) as f32
}

/// Discount `t` (of the words `t.words`, `current` their cells) by the move cost: each
/// word's current row and current column cost [`credit`] less.
fn discount(t: &mut LossTables, current: &[u32], move_cost: f64) {
    let (rr, cc) = (t.rows, t.cols);
    for (w, &cell) in current.iter().enumerate() {
        let (i, j) = (cell as usize / cc, cell as usize % cc);
        let d = credit(move_cost, t.counts[w]);
        t.lr[w * rr + i] -= d;
        t.lc[w * cc + j] -= d;
    }
}

/// Solve a round from the summed `tables` and the `current` allocation.
pub fn reallocate(tables: &LossTables, current: &[u32], o: &RoundOptions) -> Result<Reallocation> {
    let t0 = Instant::now();
    let p = problem(tables)?;
    p.check(current)
        .map_err(|e| AllocError::Input(format!("the current allocation: {e}")))?;
    let discounted = (o.move_cost > 0.0).then(|| {
        let mut t = tables.clone();
        discount(&mut t, current, o.move_cost);
        t
    });
    let solve_on = match &discounted {
        Some(t) => problem(t)?,
        None => p,
    };
    // Every word already in a cheapest cell of its own: the current allocation is the
    // optimum (it meets the lower bound), with no solve. What a high move cost makes of
    // most rounds.
    let settled =
        (0..solve_on.vocab).all(|w| solve_on.best(w) >= solve_on.cost(w, current[w] as usize));
    let (cells, kept, stats, solver) = if settled {
        let stats = serde_json::json!({
            "settled": true,
            "cost": solve_on.total(current),
            "dual_bound": solve_on.lower_bound(),
        });
        (current.to_vec(), true, stats, o.solver)
    } else {
        let (s, solver) = match solve(&solve_on, o.solver, &o.solve) {
            // The exact solver's certificate can fail to converge on tables a move cost
            // has skewed: the round is then the scalable solver's, not lost.
            Err(AllocError::Solver(why)) if o.solver == Solver::Exact => {
                tracing::warn!(%why, "the exact solver gave up: solving with the scalable one");
                let mut s = solve(&solve_on, Solver::Scalable, &o.solve)?;
                if let Some(m) = s.stats.as_object_mut() {
                    m.insert("exact_failed".into(), why.into());
                }
                (s, Solver::Scalable)
            }
            r => (r?, o.solver),
        };
        let kept = solve_on.total(&s.cells) >= solve_on.total(current);
        let mut stats = s.stats;
        if let Some(m) = stats.as_object_mut() {
            m.insert("cost".into(), s.cost.into());
            m.insert("dual_bound".into(), s.dual_bound.into());
        }
        let cells = if kept { current.to_vec() } else { s.cells };
        (cells, kept, stats, solver)
    };
    drop(discounted);
    let seconds_solve = t0.elapsed().as_secs_f64();
    let words = tables.counts.iter().sum::<u64>().max(1) as f64;
    let before = p.total(current) / words;
    let report = Report {
        solver: solver.name().into(),
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

/// One range of words of a round's summed tables, as a sparse build hands it over (a
/// distributed job: each rank its own ranges, to the coordinator): the cut of the tables
/// discounted by the move cost (the discount is exact there, where every entry is
/// known), the words' counts, and the current allocation's exact figures over them.
#[derive(Clone, Debug, PartialEq)]
pub struct SparsePart {
    /// The words of the round (the part is of `start..start + tables.vocab`).
    pub vocab: usize,
    /// The range's first word; the range is `tables.vocab` words long.
    pub start: usize,
    /// The move cost its tables are discounted by.
    pub move_cost: f64,
    pub tables: SparseTables,
    pub counts: Vec<u64>,
    pub figures: Figures,
}

/// Exact sums over a range of words, in f64: what a sparse round reports of the current
/// allocation (its tables cannot give them: a current cell may be outside the
/// candidates) and the lower bound.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Figures {
    /// sum_w L_r[w, r(w)] + L_c[w, c(w)] under the current allocation.
    pub before: f64,
    /// The same on the discounted tables.
    pub before_discounted: f64,
    /// sum_w min_i L_r[w, i] + min_j L_c[w, j].
    pub lower_bound: f64,
}

impl Figures {
    fn add(&mut self, o: &Figures) {
        self.before += o.before;
        self.before_discounted += o.before_discounted;
        self.lower_bound += o.lower_bound;
    }
}

impl SparsePart {
    /// Cut the dense tables `t` of the words `t.words` (`current`: the whole current
    /// allocation) to `k` candidates per word and side, after the move cost's discount.
    pub fn cut(mut t: LossTables, current: &[u32], move_cost: f64, k: usize) -> Result<Self> {
        let (rr, cc) = (t.rows, t.cols);
        let n = t.words.len();
        if current.len() != t.vocab
            || t.words.end > t.vocab
            || t.lr.len() != n * rr
            || t.lc.len() != n * cc
            || t.counts.len() != n
        {
            return Err(AllocError::Input(format!(
                "loss tables of words {}..{} ({} row and {} column entries, {} counts) of a \
                 vocabulary of {} with an allocation of {} words",
                t.words.start,
                t.words.end,
                t.lr.len(),
                t.lc.len(),
                t.counts.len(),
                t.vocab,
                current.len()
            )));
        }
        let cur = &current[t.words.clone()];
        if let Some((w, &c)) = cur
            .iter()
            .enumerate()
            .find(|&(_, &c)| c as usize >= rr * cc)
        {
            return Err(AllocError::Input(format!(
                "the current allocation puts word {} in cell {c} of a {rr} x {cc} table",
                t.words.start + w
            )));
        }
        let at = |t: &LossTables, w: usize| {
            let (i, j) = (cur[w] as usize / cc, cur[w] as usize % cc);
            f64::from(t.lr[w * rr + i]) + f64::from(t.lc[w * cc + j])
        };
        let min = |xs: &[f32]| xs.iter().copied().fold(f32::INFINITY, f32::min) as f64;
        let mut f = Figures::default();
        for w in 0..n {
            f.before += at(&t, w);
            f.lower_bound += min(&t.lr[w * rr..(w + 1) * rr]) + min(&t.lc[w * cc..(w + 1) * cc]);
        }
        if move_cost > 0.0 {
            discount(&mut t, cur, move_cost);
        }
        f.before_discounted = (0..n).map(|w| at(&t, w)).sum();
        let mut tables = SparseTables::empty(n, rr, cc, k);
        tables.push_cut(n, &|w, i| t.lr[w * rr + i] as f64, &|w, j| {
            t.lc[w * cc + j] as f64
        });
        Ok(Self {
            vocab: t.vocab,
            start: t.words.start,
            move_cost,
            tables,
            counts: std::mem::take(&mut t.counts),
            figures: f,
        })
    }
}

/// A round's sparse tables, put together from its parts in word order (in a single
/// process, as its ranges are built; on the coordinator, as the ranks' parts arrive).
#[derive(Clone, Debug)]
pub struct SparseRound {
    /// The cut of the discounted tables.
    pub tables: SparseTables,
    pub counts: Vec<u64>,
    pub figures: Figures,
    pub move_cost: f64,
}

impl SparseRound {
    /// The round `first` (a part of it) belongs to, empty.
    pub fn of(first: &SparsePart) -> Self {
        let t = &first.tables;
        Self::new(
            first.vocab,
            t.rows,
            t.cols,
            t.k_rows.max(t.k_cols),
            first.move_cost,
        )
    }

    pub fn new(vocab: usize, rows: usize, cols: usize, k: usize, move_cost: f64) -> Self {
        Self {
            tables: SparseTables::empty(vocab, rows, cols, k),
            counts: Vec::with_capacity(vocab),
            figures: Figures::default(),
            move_cost,
        }
    }

    /// Words in so far (the next part starts there).
    pub fn filled(&self) -> usize {
        self.tables.filled()
    }

    /// Append the next part (the one starting at [`Self::filled`]).
    pub fn push(&mut self, part: &SparsePart) -> Result<()> {
        if part.counts.len() != part.tables.vocab {
            return Err(AllocError::Input(format!(
                "a part of {} words with {} counts",
                part.tables.vocab,
                part.counts.len()
            )));
        }
        if (part.vocab, part.move_cost) != (self.tables.vocab, self.move_cost) {
            return Err(AllocError::Input(format!(
                "a part of a round of {} words discounted by {} for one of {} words by {}",
                part.vocab, part.move_cost, self.tables.vocab, self.move_cost
            )));
        }
        self.tables.append(part.start, &part.tables)?;
        self.counts.extend_from_slice(&part.counts);
        self.figures.add(&part.figures);
        Ok(())
    }
}

/// Solve a round from its sparse tables (complete: every word's part in) and the
/// `current` allocation. As [`reallocate`], with the figures a sparse round has: the
/// objective before and the lower bound exact (from the parts), the objective after
/// the solution's estimated cost with the interval its true cost lies in (`stats`:
/// `objective_after_min`, `objective_after_max`).
pub fn reallocate_sparse(
    r: &SparseRound,
    current: &[u32],
    o: &RoundOptions,
) -> Result<Reallocation> {
    let t0 = Instant::now();
    let t = &r.tables;
    if r.filled() != t.vocab {
        return Err(AllocError::Input(format!(
            "sparse loss tables of {} of {} words",
            r.filled(),
            t.vocab
        )));
    }
    if o.move_cost != r.move_cost {
        return Err(AllocError::Input(format!(
            "sparse loss tables discounted by a move cost of {} solved for one of {}",
            r.move_cost, o.move_cost
        )));
    }
    lightrnn_kernels::check_cells(t.vocab, t.rows * t.cols, current)
        .map_err(|e| AllocError::Input(format!("the current allocation: {e}")))?;
    let s = solve_sparse(t, o.solver, &o.solve)?;
    // The solution's cost is an estimate; the current allocation's exact.
    let kept = s.cost >= r.figures.before_discounted;
    let sp = SparseProblem::new(t)?;
    let (est, lo, hi) = sp.total(&s.cells);
    // Back to the undiscounted tables: add the discount of every kept row and column.
    let cc = t.cols;
    let back: f64 = if r.move_cost > 0.0 {
        (current.iter().zip(&s.cells).zip(&r.counts))
            .map(|((&a, &b), &n)| {
                let same = usize::from(a as usize / cc == b as usize / cc)
                    + usize::from(a as usize % cc == b as usize % cc);
                same as f64 * f64::from(credit(r.move_cost, n))
            })
            .sum()
    } else {
        0.0
    };
    let words = r.counts.iter().sum::<u64>().max(1) as f64;
    let mut stats = s.stats;
    if let Some(m) = stats.as_object_mut() {
        m.insert("cost".into(), s.cost.into());
        m.insert("dual_bound".into(), s.dual_bound.into());
        m.insert("relaxation_bound".into(), s.relaxation_bound.into());
        let (lo, hi) = if kept {
            (r.figures.before, r.figures.before)
        } else {
            (lo + back, hi + back)
        };
        m.insert("objective_after_min".into(), (lo / words).into());
        m.insert("objective_after_max".into(), (hi / words).into());
    }
    let after = if kept { r.figures.before } else { est + back };
    let cells = if kept { current.to_vec() } else { s.cells };
    let report = Report {
        solver: o.solver.name().into(),
        train_loss_before: r.figures.before / words,
        objective_before: r.figures.before / words,
        objective_after: after / words,
        lower_bound: r.figures.lower_bound / words,
        words_moved: current.iter().zip(&cells).filter(|(x, y)| x != y).count(),
        train_loss_after: None,
        seconds_tables: 0.0,
        seconds_solve: t0.elapsed().as_secs_f64(),
        kept_current: kept,
        stats,
    };
    Ok(Reallocation {
        cells,
        counts: r.counts.clone(),
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
        assert!(
            r.report.stats.get("settled").is_none(),
            "{}",
            r.report.stats
        );
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
        for solver in [Solver::Scalable, Solver::Exact] {
            let r = reallocate(
                &t,
                &current,
                &RoundOptions {
                    solver,
                    ..stay.clone()
                },
            )
            .unwrap();
            assert_eq!(r.cells, current);
            assert_eq!(r.report.words_moved, 0);
            assert_eq!(r.report.objective_after, r.report.objective_before);
            // Every word already in its own cheapest cell: the optimum, with no solve.
            assert_eq!(r.report.stats["settled"], true, "{}", r.report.stats);
            assert!(r.report.kept_current);
        }
        // A current allocation that is not one is refused.
        let mut bad = current.clone();
        bad[1] = 0;
        let e = reallocate(&t, &bad, &opts).unwrap_err().to_string();
        assert!(e.contains("current allocation"), "{e}");
    }

    /// The round's sparse tables from parts of `t` cut at `cuts`.
    fn sparse(
        t: &LossTables,
        current: &[u32],
        move_cost: f64,
        k: usize,
        cuts: &[usize],
    ) -> SparseRound {
        let mut r = SparseRound::new(t.vocab, t.rows, t.cols, k, move_cost);
        let bounds: Vec<usize> = [0]
            .iter()
            .chain(cuts)
            .chain([t.vocab].iter())
            .copied()
            .collect();
        for b in bounds.windows(2) {
            let part = LossTables {
                words: b[0]..b[1],
                lr: t.lr[b[0] * t.rows..b[1] * t.rows].to_vec(),
                lc: t.lc[b[0] * t.cols..b[1] * t.cols].to_vec(),
                counts: t.counts[b[0]..b[1]].to_vec(),
                ..t.clone()
            };
            r.push(&SparsePart::cut(part, current, move_cost, k).unwrap())
                .unwrap();
        }
        r
    }

    #[test]
    fn a_sparse_round_with_every_entry_a_candidate_is_the_dense_round() {
        let t = tables(60, 8, 8, 5);
        let current: Vec<u32> = (0..60).map(|w| (w * 7 % 64) as u32).collect();
        for (solver, move_cost) in [
            (Solver::Scalable, 0.0),
            (Solver::Scalable, 0.02),
            (Solver::Exact, 0.02),
            (Solver::Greedy, 0.0),
        ] {
            let opts = RoundOptions {
                solver,
                solve: SolveOptions {
                    threads: 2,
                    ..Default::default()
                },
                move_cost,
            };
            let dense = reallocate(&t, &current, &opts).unwrap();
            let r = sparse(&t, &current, move_cost, 8, &[17, 40]);
            let sparse = reallocate_sparse(&r, &current, &opts).unwrap();
            let what = format!("{solver:?}, move cost {move_cost}");
            assert_eq!(sparse.cells, dense.cells, "{what}");
            assert_eq!(sparse.counts, dense.counts, "{what}");
            let (a, b) = (&sparse.report, &dense.report);
            for (x, y) in [
                (a.objective_before, b.objective_before),
                (a.objective_after, b.objective_after),
                (a.lower_bound, b.lower_bound),
            ] {
                assert!((x - y).abs() <= 1e-9 * y.abs(), "{what}: {x} vs {y}");
            }
            assert_eq!(
                (a.words_moved, a.kept_current),
                (b.words_moved, b.kept_current),
                "{what}"
            );
        }
    }

    #[test]
    fn a_sparse_round_reports_exact_figures_and_bounds_its_true_cost() {
        let t = tables(200, 16, 16, 9);
        let p = problem(&t).unwrap();
        let current: Vec<u32> = (0..200).map(|w| (w * 3 % 256) as u32).collect();
        let words = t.counts.iter().sum::<u64>() as f64;
        for move_cost in [0.0, 0.01] {
            let opts = RoundOptions {
                solver: Solver::Scalable,
                solve: SolveOptions {
                    threads: 2,
                    ..Default::default()
                },
                move_cost,
            };
            let r = sparse(&t, &current, move_cost, 3, &[64, 65, 130]);
            let s = reallocate_sparse(&r, &current, &opts).unwrap();
            let rep = &s.report;
            let close = |x: f64, y: f64| (x - y).abs() <= 1e-9 * y.abs();
            assert!(close(rep.objective_before, p.total(&current) / words));
            assert!(close(rep.lower_bound, p.lower_bound() / words));
            assert!(!rep.kept_current && rep.words_moved > 0);
            let truth = p.total(&s.cells) / words;
            let (lo, hi) = (
                rep.stats["objective_after_min"].as_f64().unwrap(),
                rep.stats["objective_after_max"].as_f64().unwrap(),
            );
            assert!(
                lo <= rep.objective_after && rep.objective_after <= hi,
                "{rep:?}"
            );
            assert!(
                lo <= truth * (1.0 + 1e-9) && truth <= hi * (1.0 + 1e-9),
                "{truth} not in {lo}..{hi}"
            );
            assert!(
                truth < rep.objective_before,
                "{truth} vs {}",
                rep.objective_before
            );
        }
        // Moving costs more than any word gains: every word stays.
        let stay = RoundOptions {
            solver: Solver::Scalable,
            solve: SolveOptions::default(),
            move_cost: 1e6,
        };
        let r = sparse(&t, &current, 1e6, 3, &[100]);
        let s = reallocate_sparse(&r, &current, &stay).unwrap();
        assert_eq!(s.cells, current);
        assert_eq!(s.report.objective_after, s.report.objective_before);
        // The tables must be complete and discounted by the options' move cost.
        let e = reallocate_sparse(
            &r,
            &current,
            &RoundOptions {
                move_cost: 0.5,
                ..stay.clone()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("move cost"), "{e}");
        let mut half = SparseRound::new(200, 16, 16, 3, 1e6);
        let part = LossTables {
            words: 0..100,
            lr: t.lr[..100 * 16].to_vec(),
            lc: t.lc[..100 * 16].to_vec(),
            counts: t.counts[..100].to_vec(),
            ..t.clone()
        };
        let part = SparsePart::cut(part, &current, 1e6, 3).unwrap();
        half.push(&part).unwrap();
        let e = reallocate_sparse(&half, &current, &stay)
            .unwrap_err()
            .to_string();
        assert!(e.contains("100 of 200 words"), "{e}");
        // Parts go in word order, once.
        let e = half.push(&part).unwrap_err().to_string();
        assert!(e.contains("end at word 100"), "{e}");
    }
}
