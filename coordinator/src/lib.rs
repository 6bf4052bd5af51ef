//! lightrnn-coordinator: the control plane of a distributed job and the `lightrnn`
//! program. On one machine, `train` runs the whole job in this process (the embedded
//! default: CPU backend, local object store); with `--workers N` a coordinator here and N
//! worker processes.
//!
//! - [`job`]: one job's protocol (spec, state, faults, epochs, rounds, commits);
//!   [`service`]: its tonic service; [`serve`]: serving it until it ends;
//! - [`launch`]: jobs launched from this process (worker processes, metrics);
//! - [`cli`]: the arguments and the dispatch to [`commands`], one module per subcommand;
//! - [`metrics`]: the Prometheus endpoint; [`plot`]: PNG pictures; [`tls`]: TLS;
//! - [`signals`]: the stop flag that SIGTERM, SIGINT and SIGUSR1 set.

pub mod cli;
pub mod commands;
mod error;
pub mod guard;
pub mod job;
pub mod launch;
pub mod metrics;
pub mod plot;
pub mod serve;
pub mod service;
pub mod signals;
pub mod tls;

pub use error::{Error, Result};
pub use signals::Stop;
