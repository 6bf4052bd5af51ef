//! lightrnn-alloc: word allocation, called by a single-process run and by the coordinator
//! alike. [`round::reallocate`] is the central step of a reallocation round (move cost,
//! solve, keep-if-better, report); [`solve()`] the solvers behind it; [`carry`] what the
//! ranks do with their vectors when the words move.
//!
//! Word allocation: assign the V words to distinct cells of the R x C table minimising
//! sum_w L_r[w, r(w)] + L_c[w, c(w)] — a linear assignment of V words to R*C cells
//! whose cost is separable: cost(w, (i, j)) = L_r[w, i] + L_c[w, j].
//!
//! Three solvers behind [`solve()`], all returning a complete word -> cell permutation:
//! - [`Solver::Exact`]: shortest augmenting paths on candidate cells, then a dual
//!   certificate checked over all V x R*C pairs (cheap with the separable cost); pairs
//!   that violate it are added and the solve continues until none does. The result is
//!   optimal, without ever forming a dense V x V matrix.
//! - [`Solver::Scalable`]: prices from the row and column relaxation (words into rows of
//!   capacity C, into columns of capacity R; two small auctions), each word's best rows
//!   and columns under those prices as candidates, shortest augmenting paths on them,
//!   and a repair pass that places any word left over in its best free cell.
//! - [`Solver::Greedy`]: the heuristic of the official implementation (rows first, words
//!   in order of their expected loss, then columns row by row): the baseline.
//!
//! Its modules, each using only those listed before it:
//!
//! - `error`: [`AllocError`] and the crate's [`Result`];
//! - `problem`: the loss tables as a [`Problem`], the [`Solver`] to use, its
//!   [`SolveOptions`] and the [`Solution`] it returns;
//! - `sap`, `auction`, `prices`: shortest augmenting paths, the cells' auction, the
//!   row/column relaxation's prices;
//! - `costs`, `cells`: what the solvers read of dense and sparse tables alike; the
//!   relaxation, candidates and the cell-level solve;
//! - `decompose`, `improve`, `exact`, `greedy`, `scalable`: the large-table path, the
//!   local improvement, and the three solvers;
//! - `solve`: [`solve()`], the relaxation and then the chosen solver in a thread pool;
//! - `memory`: the memory bounds of a solve and of a round ([`round_memory_bound`],
//!   [`sparse_round_memory_bound`], ...);
//! - [`sparse`]: sparse loss tables and their solve;
//! - [`round`]: the central step of a reallocation round;
//! - [`carry`]: what moves with a word when it changes cells.

mod auction;
pub mod carry;
mod cells;
mod costs;
mod decompose;
mod error;
mod exact;
mod greedy;
mod improve;
mod memory;
mod prices;
mod problem;
pub mod round;
mod sap;
mod scalable;
mod solve;
pub mod sparse;
#[cfg(test)]
mod testutil;

pub use carry::{Carry, carry_vectors};
pub use error::{AllocError, Result};
pub use memory::{
    round_memory_bound, solve_memory_bound, solver_memory_bound, sparse_bytes,
    sparse_round_memory_bound, tables_bytes,
};
pub use problem::{Elem, Problem, Solution, SolveOptions, Solver};
pub use round::{
    Figures, Reallocation, Report, RoundOptions, SparsePart, SparseRound, nan_if_null, reallocate,
    reallocate_sparse,
};
pub use solve::solve;
pub use sparse::{SparseProblem, SparseTables, solve_sparse};
