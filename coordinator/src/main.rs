//! `lightrnn`: parse, install logging, run the command, print its result.

use clap::Parser;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lightrnn_coordinator::cli::{Cli, LogFormat, Stop, run};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_env("LIGHTRNN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the I/O runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // SIGTERM/SIGINT (and SIGUSR1, SLURM's warning signal): training stops at its next
    // step with a checkpoint (all ranks of a job at the same step) and exits 0; past the grace period the process gives up.
    let stop: Stop = Arc::new(AtomicBool::new(false));
    {
        let (stop, grace) = (stop.clone(), Duration::from_secs(cli.grace_s));
        rt.spawn(async move {
            let (mut term, mut usr1) = match (
                signal(SignalKind::terminate()),
                signal(SignalKind::user_defined1()),
            ) {
                (Ok(t), Ok(u)) => (t, u),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(error = %e, "no SIGTERM/SIGUSR1 handler");
                    return;
                }
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = usr1.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::warn!(
                grace_s = grace.as_secs(),
                "stop requested: checkpointing at the next step"
            );
            stop.store(true, Ordering::Relaxed);
            tokio::time::sleep(grace).await;
            eprintln!(
                "error: the stop did not complete within the {} s grace period",
                grace.as_secs()
            );
            std::process::exit(1);
        });
    }
    match run(&cli, rt.handle(), &stop) {
        Ok(out) => {
            println!("{out}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
