//! `lightrnn allocate`: loss tables in (.npy), an allocation out (.npy), one JSON line
//! with the solver's figures.

use bytes::Bytes;
use clap::Args;
use tokio::runtime::Handle;

use lightrnn_alloc::{Problem, SolveOptions, Solver, solve};
use lightrnn_worker::data::npy;
use lightrnn_worker::data::store::split_object;

use crate::Result;
use crate::error::usage;

#[derive(Args, Debug, Clone)]
pub struct AllocateArgs {
    /// [V, R] row losses (.npy: float32, float64, int64 or uint32).
    #[arg(long)]
    pub row_loss: String,
    /// [V, C] column losses (.npy: float32, float64, int64 or uint32).
    #[arg(long)]
    pub col_loss: String,
    /// exact, scalable or greedy.
    #[arg(long, default_value = "scalable")]
    pub solver: String,
    /// Output: the cell (row * C + col) of every word, int64 .npy.
    #[arg(long)]
    pub out: String,
    /// Replace `--out` when it exists.
    #[arg(long)]
    pub force: bool,
    /// Threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Candidate rows and columns per word (0 = the solver's default).
    #[arg(long, default_value_t = 0)]
    pub candidates: usize,
}

/// Peak resident set size of this process in MiB (Linux).
pub fn peak_rss_mib() -> Option<f64> {
    lightrnn_worker::train::bench::rss_mib().0
}

/// Refuse to replace an existing output unless `force`.
pub fn refuse_overwrite(
    handle: &Handle,
    loc: &lightrnn_worker::data::store::Location,
    name: &str,
    what: &str,
    force: bool,
) -> Result<()> {
    if !force && handle.block_on(loc.head(name))?.is_some() {
        return usage(format!("{what} exists; pass --force to replace it"));
    }
    Ok(())
}

/// A `.npy` array from a path or object URL.
pub fn read_npy(path: &str, handle: &Handle) -> Result<npy::Array> {
    let (loc, name) = split_object(path)?;
    let bytes = handle.block_on(loc.get(&name))?;
    Ok(npy::decode(bytes, path)?)
}

pub fn run(a: &AllocateArgs, handle: &Handle) -> Result<String> {
    let opts = SolveOptions {
        threads: a.threads,
        candidates: a.candidates,
    };
    let solver: Solver = a.solver.parse()?;
    let (loc, name) = split_object(&a.out)?;
    refuse_overwrite(handle, &loc, &name, &a.out, a.force)?;
    let t0 = std::time::Instant::now();
    let (ta, tb) = (
        read_npy(&a.row_loss, handle)?,
        read_npy(&a.col_loss, handle)?,
    );
    let (v, r, c) = match (&ta.shape[..], &tb.shape[..]) {
        ([v, r], [v2, c]) if v == v2 => (*v, *r, *c),
        _ => {
            return usage(format!(
                "tables must be [V, R] and [V, C] with the same V; got {:?} and {:?}",
                ta.shape, tb.shape
            ));
        }
    };
    let t_read = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let sol = match (ta.as_f32(), tb.as_f32(), ta.as_f64(), tb.as_f64()) {
        (Some(lr), Some(lc), _, _) => solve(&Problem::new(v, r, c, lr, lc)?, solver, &opts)?,
        (_, _, Some(lr), Some(lc)) => solve(&Problem::new(v, r, c, lr, lc)?, solver, &opts)?,
        _ => {
            let (lr, lc) = (ta.to_f64(), tb.to_f64());
            solve(&Problem::new(v, r, c, &lr, &lc)?, solver, &opts)?
        }
    };
    let seconds = t1.elapsed().as_secs_f64();
    drop((ta, tb));
    if ![sol.cost, sol.lower_bound, sol.relaxation_bound]
        .iter()
        .all(|x| x.is_finite())
    {
        return Err(crate::Error::Job(format!(
            "coordinator: the {} solve gave a non-finite cost ({}) or bound ({}, {}); \
             nothing was written",
            solver.name(),
            sol.cost,
            sol.lower_bound,
            sol.relaxation_bound
        )));
    }
    let cells: Vec<i64> = sol.cells.iter().map(|&x| x as i64).collect();
    handle.block_on(loc.put(&name, Bytes::from(npy::encode_i64(&cells))))?;
    Ok(serde_json::json!({
        "solver": solver.name(),
        "cost": sol.cost,
        "lower_bound": sol.lower_bound,
        "relaxation_bound": sol.relaxation_bound,
        "gap_to_relaxation_bound": (sol.cost - sol.relaxation_bound) / sol.relaxation_bound.abs().max(1e-300),
        "dual_bound": sol.dual_bound,
        "gap_to_lower_bound": (sol.cost - sol.lower_bound) / sol.lower_bound.abs().max(1e-300),
        "seconds": seconds,
        "seconds_reading": t_read,
        "peak_rss_mib": peak_rss_mib(),
        "vocab": v, "rows": r, "cols": c,
        "stats": sol.stats,
    })
    .to_string())
}
