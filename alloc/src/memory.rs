//! The memory bounds of the allocation step, by which a caller refuses a solve or a
//! reallocation round before it starts where the memory is not there: the solve's heap
//! beyond its tables, the tables' own bytes (dense and sparse), and a round's whole step.

use crate::exact;
use crate::problem::Solver;

/// The most heap a scalable or greedy solve takes beyond its tables, on any values
/// (nearly uniform and tied tables included; tested in tests/memory.rs): 4 KiB per word,
/// 64 bytes per cell and 16 MiB. The exact solver adds at most 48 bytes for each of its
/// candidate edges, which it caps at 1024 per word (tables more tied than that are refused by it).
pub fn solve_memory_bound(vocab: usize, cells: usize) -> u64 {
    4096 * vocab as u64 + 64 * cells as u64 + (16 << 20)
}

/// [`solve_memory_bound`] for `solver`, the exact solver's edges included.
pub fn solver_memory_bound(solver: Solver, vocab: usize, cells: usize) -> u64 {
    let edges = match solver {
        Solver::Exact => 48 * (exact::MAX_EDGES_PER_WORD * vocab) as u64,
        _ => 0,
    };
    solve_memory_bound(vocab, cells) + edges
}

/// The memory of a reallocation round's central step on
/// [`LossTables`](lightrnn_kernels::LossTables) of V x (R + C): the tables, a discounted
/// copy when moves cost something, and the solve.
pub fn round_memory_bound(vocab: usize, rows: usize, cols: usize, move_cost: f64) -> u64 {
    let tables = tables_bytes(vocab, rows, cols);
    let copies = if move_cost > 0.0 { 2 } else { 1 };
    copies * tables + solve_memory_bound(vocab, rows * cols)
}

/// Bytes of [`SparseTables`](crate::SparseTables) of V words with `k` candidates per
/// side, with the counts.
pub fn sparse_bytes(vocab: usize, rows: usize, cols: usize, k: usize) -> u64 {
    let (kr, kc) = (k.clamp(1, rows.max(1)), k.clamp(1, cols.max(1)));
    (vocab * (8 * (kr + kc) + 24)) as u64
}

/// The memory of a reallocation round's central step on sparse tables: the tables as
/// their parts arrive and as the solver reads them, 512 bytes per word, 64 per cell and
/// 16 MiB. An estimate above every peak measured (docs/benchmarks.md, section 13: 957
/// MiB at V = 1M, k = 16, where this gives 1.1 GiB), to refuse a round before its
/// passes where the memory is clearly not there; not a tested bound.
pub fn sparse_round_memory_bound(vocab: usize, rows: usize, cols: usize, k: usize) -> u64 {
    2 * sparse_bytes(vocab, rows, cols, k)
        + 512 * vocab as u64
        + 64 * (rows * cols) as u64
        + (16 << 20)
}

/// Bytes of [`LossTables`](lightrnn_kernels::LossTables) of V x (R + C) (f32 tables and
/// u64 counts).
pub fn tables_bytes(vocab: usize, rows: usize, cols: usize) -> u64 {
    (vocab * (rows + cols) * 4 + vocab * 8) as u64
}
