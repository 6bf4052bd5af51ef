//! The sizes both sides of the wire agree on.

/// Largest gRPC message either side accepts (table and allocation chunks stay below it).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Bytes of table or allocation data per streamed chunk.
pub const CHUNK_BYTES: usize = 4 << 20;
