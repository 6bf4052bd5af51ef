//! The process's stop signals: SIGTERM, SIGINT, SIGHUP (the terminal went away) and
//! SIGUSR1 (SLURM's warning). In a command that trains ([`OnStop::Checkpoint`]) they set
//! the stop flag: training stops at its next step with a checkpoint (all ranks of a job
//! at the same step) and the program exits 0; past the grace period after a SIGTERM,
//! SIGINT or SIGHUP the process gives up (SIGUSR1 sets no deadline: the scheduler's
//! SIGTERM at the time limit follows it). Any other command ([`OnStop::Exit`]) has
//! nothing to save and ends at once with status 128 + the signal's number; the files it
//! wrote before are whole (every object is written atomically), the ones it had not
//! written yet are absent.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::signal::unix::{SignalKind, signal};

/// Set when the process is asked to stop (SIGTERM, SIGINT, SIGUSR1): training stops at a
/// step all ranks agree on, with a checkpoint.
pub type Stop = Arc<AtomicBool>;

/// What a stop signal does to the running command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnStop {
    /// Set the stop flag: the command checkpoints and ends (train, coordinator, worker).
    Checkpoint,
    /// End the process now: the command has nothing to save.
    Exit,
}

/// The first stop signal this process received ("SIGUSR1", "SIGTERM", ...).
static RECEIVED: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// The first stop signal this process received, if any: the summary names it, so a
/// scheduler's script tells SLURM's warning (SIGUSR1: requeue) from a cancel.
pub fn stop_signal() -> Option<&'static str> {
    RECEIVED.get().copied()
}

/// Install the handlers on `handle`'s runtime; the flag they set.
pub fn stop_on_signals(handle: &Handle, grace: Duration, on_stop: OnStop) -> Stop {
    let stop: Stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    handle.spawn(async move {
        let kinds = [
            (SignalKind::terminate(), "SIGTERM", 15),
            (SignalKind::interrupt(), "SIGINT", 2),
            (SignalKind::hangup(), "SIGHUP", 1),
            (SignalKind::user_defined1(), "SIGUSR1", 10),
        ];
        let mut streams = Vec::new();
        for (kind, name, number) in kinds {
            match signal(kind) {
                Ok(s) => streams.push((s, name, number)),
                Err(e) => {
                    tracing::warn!(error = %e, signal = name, "no handler for stop signals");
                    return;
                }
            }
        }
        let [a, b, c, d] = &mut streams[..] else {
            return;
        };
        let mut warned = false;
        loop {
            let (name, number) = tokio::select! {
                _ = a.0.recv() => (a.1, a.2),
                _ = b.0.recv() => (b.1, b.2),
                _ = c.0.recv() => (c.1, c.2),
                _ = d.0.recv() => (d.1, d.2),
            };
            if on_stop == OnStop::Exit {
                say(format_args!(
                    "error: stopped by {name} before the command finished"
                ));
                std::process::exit(128 + number);
            }
            let _ = RECEIVED.set(name);
            flag.store(true, Ordering::Relaxed);
            if name == "SIGUSR1" {
                // SLURM's warning before the time limit: stop at the next step, with
                // no deadline of this process's own (the scheduler's SIGTERM that
                // follows at the limit starts the grace period).
                if !warned {
                    tracing::warn!(
                        signal = name,
                        "stop requested: checkpointing at the next step"
                    );
                }
                warned = true;
                continue;
            }
            tracing::warn!(
                signal = name,
                grace_s = grace.as_secs(),
                "stop requested: checkpointing at the next step"
            );
            break;
        }
        tokio::time::sleep(grace).await;
        say(format_args!(
            "error: the stop did not complete within the {} s grace period",
            grace.as_secs()
        ));
        std::process::exit(1);
    });
    stop
}

/// One line on stderr, or nothing where stderr is closed.
fn say(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}
