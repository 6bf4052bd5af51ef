//! `lightrnn train`: a run in this process (the embedded default: the CPU backend, any
//! object store), or with `--workers N` through a coordinator here and N worker
//! processes on loopback.

use std::io::IsTerminal;

use clap::Args;
use tokio::runtime::Handle;

use lightrnn_core::data::store::Location;
use lightrnn_core::report::ReportSink;
use lightrnn_worker::train::{RunOptions, train};

use super::{RunArgs, backend_kind, resolve_config};
use crate::job::spec::PrepareBy;
use crate::launch::{RunSpec, job_spec, summary_line, train_workers};
use crate::{Result, Stop};

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Train data-parallel in N worker processes on this machine, through a coordinator
    /// in this process (the config's batch is the global batch, split evenly). With a
    /// CUDA backend each worker gets its own GPU (worker k: device k); 0 = one worker per
    /// visible GPU (also `auto`).
    #[arg(long, value_parser = parse_workers)]
    pub workers: Option<usize>,
}

/// `--workers N`, or `auto` (0: one worker per visible GPU).
fn parse_workers(s: &str) -> std::result::Result<usize, String> {
    match s {
        "auto" => Ok(0),
        n => n
            .parse()
            .map_err(|_| format!("{n:?}: expected a number of workers, or auto")),
    }
}

pub fn run(t: &TrainArgs, handle: &Handle, stop: &Stop) -> Result<String> {
    let a = &t.run;
    let cfg = resolve_config(&a.config)?;
    if let Some(workers) = t.workers {
        let workers = crate::launch::worker_count(workers, &a.backend)?;
        let run = RunSpec {
            cfg,
            data: &a.data,
            out: &a.out,
            resume: a.resume,
            backend: &a.backend,
            // The workers are this machine's processes: they read what it reads.
            prepare_by: PrepareBy::Workers,
        };
        let spec = job_spec(run, (workers, workers), handle)?;
        let outcome = train_workers(spec, workers, a.metrics_addr.as_deref(), handle, stop)?;
        return Ok(summary_line(&outcome, &a.out));
    }
    let mut opts = RunOptions {
        data: Location::parse(&a.data)?,
        out: Location::parse(&a.out)?,
        resume: a.resume,
        checkpoint: None,
        backend: backend_kind(&a.backend)?,
        progress: std::io::stderr().is_terminal(),
        stop: Some(stop.clone()),
        report: None,
        open: None,
    };
    let server = match &a.metrics_addr {
        Some(addr) => {
            let sink: ReportSink = Default::default();
            opts.report = Some(sink.clone());
            let listener = handle.block_on(crate::metrics::bind(addr))?;
            Some(handle.spawn(crate::metrics::serve(
                listener,
                std::sync::Arc::new(move || crate::metrics::single_process(&sink)),
            )))
        }
        None => None,
    };
    let s = train(&cfg, &opts, handle);
    if let Some(h) = server {
        h.abort();
    }
    Ok(s?.line(opts.out.url()).to_string())
}
