//! The process's stop signals: SIGTERM, SIGINT and SIGUSR1 (SLURM's warning) set the stop
//! flag; training stops at its next step with a checkpoint (all ranks of a job at the
//! same step) and the program exits 0; past the grace period the process gives up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::signal::unix::{SignalKind, signal};

use crate::Stop;

/// Install the handlers on `handle`'s runtime; the flag they set.
pub fn stop_on_signals(handle: &Handle, grace: Duration) -> Stop {
    let stop: Stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    handle.spawn(async move {
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
        flag.store(true, Ordering::Relaxed);
        tokio::time::sleep(grace).await;
        eprintln!(
            "error: the stop did not complete within the {} s grace period",
            grace.as_secs()
        );
        std::process::exit(1);
    });
    stop
}
