//! lightrnn-coordinator: the `lightrnn` program. On one machine, `train` runs the whole job
//! in this process (the embedded default: CPU backend, local object store); the
//! subcommands parse and validate their arguments into the worker's configuration types
//! and call into the libraries.

pub mod cli;
pub mod commands;
pub mod launch;
pub mod metrics;
pub mod plot;
pub mod server;
pub mod tls;
