//! The CPU backend: [`Engine`] (generic math) and [`CpuBackend`] (its `f32` instance behind
//! the [`crate::Backend`] boundary).

mod engine;
pub mod gemm;
pub mod simd;
pub mod team;

pub use engine::{
    Batch, Engine, LossSums, Pass, State, StreamId, check_allocation, random_allocation, row_of,
};
