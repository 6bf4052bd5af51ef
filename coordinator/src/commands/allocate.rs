//! `lightrnn allocate`: loss tables in (.npy), an allocation out (.npy), one JSON line
//! with the solver's figures.

use bytes::Bytes;
use clap::Args;
use tokio::runtime::Handle;

use lightrnn_alloc::{Problem, SolveOptions, Solver, SparseTables, solve, solve_sparse};
use lightrnn_core::data::npy;
use lightrnn_core::data::store::{Location, split_object};

use crate::Result;
use crate::error::usage;

#[derive(Args, Debug, Clone)]
pub struct AllocateArgs {
    /// A table directory: sparse tables (tables.json, rows.npy, row_loss.npy, cols.npy,
    /// col_loss.npy, row_sum.npy, col_sum.npy) or dense ones (L_r.npy, L_c.npy).
    #[arg(long, conflicts_with_all = ["row_loss", "col_loss"], required_unless_present_all = ["row_loss", "col_loss"])]
    pub tables: Option<String>,
    /// [V, R] row losses (.npy: float32, float64, int64 or uint32).
    #[arg(long, requires = "col_loss")]
    pub row_loss: Option<String>,
    /// [V, C] column losses (.npy: float32, float64, int64 or uint32).
    #[arg(long, requires = "row_loss")]
    pub col_loss: Option<String>,
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
    lightrnn_core::util::rss_mib().0
}

/// Refuse to replace an existing output unless `force`.
pub fn refuse_overwrite(
    handle: &Handle,
    loc: &lightrnn_core::data::store::Location,
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
    let (row_loss, col_loss) = match &a.tables {
        Some(dir) => {
            let d = Location::parse(dir)?;
            if handle.block_on(d.head("tables.json"))?.is_some() {
                return run_sparse(a, &d, solver, &opts, handle);
            }
            (d.url_of("L_r.npy"), d.url_of("L_c.npy"))
        }
        None => (
            a.row_loss.clone().unwrap_or_default(),
            a.col_loss.clone().unwrap_or_default(),
        ),
    };
    let (ta, tb) = (read_npy(&row_loss, handle)?, read_npy(&col_loss, handle)?);
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
    report(a, solver, &sol, seconds, t_read, (v, r, c), handle)
}

/// Sparse tables from directory `d` (docs/allocation.md, "Sparse tables").
fn run_sparse(
    a: &AllocateArgs,
    d: &Location,
    solver: Solver,
    opts: &SolveOptions,
    handle: &Handle,
) -> Result<String> {
    let t0 = std::time::Instant::now();
    let t = read_sparse(d, handle)?;
    let t_read = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let sol = solve_sparse(&t, solver, opts)?;
    let seconds = t1.elapsed().as_secs_f64();
    let shape = (t.vocab, t.rows, t.cols);
    drop(t);
    report(a, solver, &sol, seconds, t_read, shape, handle)
}

/// The `format` of a sparse table directory's tables.json.
pub const SPARSE_FORMAT: &str = "lightrnn-sparse-tables";

/// Read sparse tables: `tables.json` gives the shape, the arrays must match it.
pub fn read_sparse(d: &Location, handle: &Handle) -> Result<SparseTables> {
    let what = |n: &str| d.url_of(n);
    let meta: serde_json::Value =
        serde_json::from_slice(&handle.block_on(d.get("tables.json"))?)
            .map_err(|e| crate::Error::Usage(format!("{}: {e}", what("tables.json"))))?;
    let field = |k: &str| {
        meta[k].as_u64().map(|x| x as usize).ok_or_else(|| {
            crate::Error::Usage(format!("{}: no integer {k:?}", what("tables.json")))
        })
    };
    if meta["format"] != SPARSE_FORMAT {
        return usage(format!(
            "{}: format is not \"lightrnn-sparse-tables\"",
            what("tables.json")
        ));
    }
    let (vocab, rows, cols) = (field("vocab")?, field("rows")?, field("cols")?);
    let array = |n: &str, width: Option<usize>| -> Result<npy::Array> {
        let arr = read_npy(&what(n), handle)?;
        let ok = match (width, &arr.shape[..]) {
            (Some(_), [v, _]) | (None, [v]) => *v == vocab,
            _ => false,
        };
        if !ok {
            return usage(format!(
                "{}: shape {:?}, expected [{vocab}{}]",
                what(n),
                arr.shape,
                if width.is_some() { ", k" } else { "" }
            ));
        }
        Ok(arr)
    };
    // Each array converted as it is read and its bytes dropped: the peak is the tables
    // and one file, not every file and the tables.
    let idx = |n: &str| -> Result<(Vec<usize>, Vec<u32>)> {
        let arr = array(n, Some(0))?;
        let v = arr
            .to_u32()
            .map_err(|e| crate::Error::Usage(format!("{}: {e}", what(n))))?;
        Ok((arr.shape, v))
    };
    let loss = |n: &str| -> Result<(Vec<usize>, Vec<f32>)> {
        let arr = array(n, Some(0))?;
        let v = arr.to_f32();
        Ok((arr.shape, v))
    };
    let (ris, row_idx) = idx("rows.npy")?;
    let (rls, row_loss) = loss("row_loss.npy")?;
    let (cis, col_idx) = idx("cols.npy")?;
    let (cls, col_loss) = loss("col_loss.npy")?;
    if ris != rls || cis != cls {
        return usage(format!(
            "{}: rows/row_loss and cols/col_loss must have the same shapes; got {:?}/{:?} and {:?}/{:?}",
            d.url_of(""),
            ris,
            rls,
            cis,
            cls
        ));
    }
    Ok(SparseTables {
        vocab,
        rows,
        cols,
        k_rows: ris[1],
        k_cols: cis[1],
        row_idx,
        row_loss,
        col_idx,
        col_loss,
        row_sum: array("row_sum.npy", None)?.to_f64(),
        col_sum: array("col_sum.npy", None)?.to_f64(),
    })
}

/// Write the allocation and the JSON line.
fn report(
    a: &AllocateArgs,
    solver: Solver,
    sol: &lightrnn_alloc::Solution,
    seconds: f64,
    t_read: f64,
    (v, r, c): (usize, usize, usize),
    handle: &Handle,
) -> Result<String> {
    let (loc, name) = split_object(&a.out)?;
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
