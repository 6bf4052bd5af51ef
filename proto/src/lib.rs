//! The wire between the coordinator and the workers: the messages and the tonic client
//! and server of `proto/lightrnn.proto` (package `lightrnn.v1`), generated at build time.
//! Nothing else lives here; conversions to domain types sit with their users.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("lightrnn.v1");
}

pub use v1::coordinator_client::CoordinatorClient;
pub use v1::coordinator_server::{Coordinator, CoordinatorServer};

pub mod auth;
mod limits;
mod redact;

pub use limits::{CHUNK_BYTES, MAX_MESSAGE_BYTES};
