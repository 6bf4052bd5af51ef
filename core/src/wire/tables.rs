//! Loss tables and allocations on the wire: the pushes of dense and sparse tables (cut
//! into chunks here on the worker, their heads typed here for the coordinator), the
//! allocation's chunks and report, and the one codec of the arrays that travel in chunks.

use lightrnn_alloc::{Report, SparsePart};
use lightrnn_kernels::LossTables;
use lightrnn_proto::CHUNK_BYTES;
use lightrnn_proto::v1::{self, SparseKind, TableKind};

use super::{bad, size};
use crate::protocol::{
    FetchAllocation, SparseArray, SparseChunk, SparseHead, TableArray, TableChunk, TableHead,
};
use crate::{Error, Result};

impl From<v1::TableChunk> for TableChunk {
    fn from(c: v1::TableChunk) -> Self {
        let kind = match TableKind::try_from(c.kind) {
            Ok(TableKind::Rows) => Some(TableArray::Rows),
            Ok(TableKind::Cols) => Some(TableArray::Cols),
            Ok(TableKind::Counts) => Some(TableArray::Counts),
            Ok(TableKind::Cells) => Some(TableArray::Cells),
            _ => None,
        };
        Self {
            head: TableHead {
                generation: c.generation,
                rank: c.rank,
                round: c.round,
                vocab: c.vocab,
                rows: c.rows,
                cols: c.cols,
                move_cost: c.move_cost,
            },
            kind,
            offset: c.offset,
            data: c.data,
        }
    }
}

impl From<v1::SparseChunk> for SparseChunk {
    fn from(c: v1::SparseChunk) -> Self {
        use SparseArray as A;
        let kind = match SparseKind::try_from(c.kind) {
            Ok(SparseKind::RowIdx) => Some(A::RowIdx),
            Ok(SparseKind::RowLoss) => Some(A::RowLoss),
            Ok(SparseKind::ColIdx) => Some(A::ColIdx),
            Ok(SparseKind::ColLoss) => Some(A::ColLoss),
            Ok(SparseKind::RowSum) => Some(A::RowSum),
            Ok(SparseKind::ColSum) => Some(A::ColSum),
            Ok(SparseKind::Counts) => Some(A::Counts),
            Ok(SparseKind::Cells) => Some(A::Cells),
            _ => None,
        };
        Self {
            head: SparseHead {
                generation: c.generation,
                rank: c.rank,
                round: c.round,
                vocab: c.vocab,
                rows: c.rows,
                cols: c.cols,
                k_rows: c.k_rows,
                k_cols: c.k_cols,
                move_cost: c.move_cost,
                start: c.start,
                words: c.words,
                before: c.before,
                before_discounted: c.before_discounted,
                lower_bound: c.lower_bound,
                last: c.last,
            },
            kind,
            offset: c.offset,
            data: c.data,
        }
    }
}

impl From<v1::AllocationRequest> for FetchAllocation {
    fn from(r: v1::AllocationRequest) -> Self {
        Self {
            generation: r.generation,
            rank: r.rank,
            round: r.round,
        }
    }
}

/// A reallocation round's report as the wire carries it.
pub fn report_to_wire(r: &Report) -> v1::ReallocReport {
    {
        v1::ReallocReport {
            solver: r.solver.clone(),
            train_loss_before: r.train_loss_before,
            objective_before: r.objective_before,
            objective_after: r.objective_after,
            lower_bound: r.lower_bound,
            words_moved: r.words_moved as u64,
            train_loss_after: r.train_loss_after,
            seconds_tables: r.seconds_tables,
            seconds_solve: r.seconds_solve,
            kept_current: r.kept_current,
            stats_json: r.stats.to_string(),
        }
    }
}

/// A reallocation round's report from the wire.
pub fn report_from_wire(r: v1::ReallocReport) -> Result<Report> {
    {
        Ok(Report {
            solver: r.solver,
            train_loss_before: r.train_loss_before,
            objective_before: r.objective_before,
            objective_after: r.objective_after,
            lower_bound: r.lower_bound,
            words_moved: size("reallocation report", r.words_moved)?,
            train_loss_after: r.train_loss_after,
            seconds_tables: r.seconds_tables,
            seconds_solve: r.seconds_solve,
            kept_current: r.kept_current,
            stats: serde_json::from_str(&r.stats_json)
                .map_err(|e| bad("reallocation report", e))?,
        })
    }
}

/// An element of the arrays that travel in chunks, little-endian.
pub trait Elem: Copy + Default {
    const BYTES: usize;
    fn put(self, out: &mut Vec<u8>);
    fn get(b: &[u8]) -> Self;
}

/// `Elem` for a primitive with `to_le_bytes` / `from_le_bytes` of `N` bytes.
macro_rules! le_elem {
    ($($t:ty: $n:literal),*) => {$(
        impl Elem for $t {
            const BYTES: usize = $n;
            fn put(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn get(b: &[u8]) -> Self {
                let mut a = [0u8; $n];
                a.copy_from_slice(&b[..$n]);
                <$t>::from_le_bytes(a)
            }
        }
    )*};
}

le_elem!(f32: 4, u32: 4, u64: 8, f64: 8);

/// The element ranges that cut `len` elements of `T` into chunks of at most
/// [`CHUNK_BYTES`] (at least one element each).
pub fn pieces<T: Elem>(len: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let per = (CHUNK_BYTES / T::BYTES).max(1);
    (0..len.div_ceil(per)).map(move |k| k * per..((k + 1) * per).min(len))
}

/// Little-endian bytes of `values`.
pub fn encode<T: Elem>(values: &[T]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * T::BYTES);
    for &v in values {
        v.put(&mut out);
    }
    out
}

/// Decode the chunk `data` at element `offset` into `dst`; the elements it held. A
/// partial element or a range outside `dst` is an error.
pub fn decode_into<T: Elem>(dst: &mut [T], offset: u64, data: &[u8]) -> Result<usize> {
    each_into(dst, offset, data, |d, x| *d = x)
}

/// Add the elements of `data` to `dst` from `offset`; how many there were.
pub fn add_into<T: Elem + std::ops::AddAssign>(
    dst: &mut [T],
    offset: u64,
    data: &[u8],
) -> Result<usize> {
    each_into(dst, offset, data, |d, x| *d += x)
}

/// `f(dst[offset + k], element k of data)` for every element of `data`, after checking
/// that they fit.
fn each_into<T: Elem>(
    dst: &mut [T],
    offset: u64,
    data: &[u8],
    f: impl Fn(&mut T, T),
) -> Result<usize> {
    if !data.len().is_multiple_of(T::BYTES) {
        return Err(bad("chunk", "it ends inside an element"));
    }
    let n = data.len() / T::BYTES;
    let len = dst.len();
    let out_of_range = || bad("chunk", format!("elements {offset}+{n} of {len}"));
    let start = usize::try_from(offset).map_err(|_| out_of_range())?;
    let end = start.checked_add(n).ok_or_else(out_of_range)?;
    let dst = dst.get_mut(start..end).ok_or_else(out_of_range)?;
    for (d, b) in dst.iter_mut().zip(data.chunks_exact(T::BYTES)) {
        f(d, T::get(b));
    }
    Ok(n)
}

/// The chunks of one rank's loss tables (rows, columns, counts) and of `cells` (rank 0's
/// current allocation; empty from the others), each a copy of `head` with its part. The
/// iterator owns the tables and encodes one chunk at a time, so a push streams tables of
/// any size without a second copy.
pub fn table_chunks(
    tables: LossTables,
    cells: Vec<u32>,
    head: v1::TableChunk,
) -> impl Iterator<Item = v1::TableChunk> + Send + 'static {
    let mut parts: Vec<(TableKind, std::ops::Range<usize>)> = Vec::new();
    parts.extend(pieces::<f32>(tables.lr.len()).map(|r| (TableKind::Rows, r)));
    parts.extend(pieces::<f32>(tables.lc.len()).map(|r| (TableKind::Cols, r)));
    parts.extend(pieces::<u64>(tables.counts.len()).map(|r| (TableKind::Counts, r)));
    parts.extend(pieces::<u32>(cells.len()).map(|r| (TableKind::Cells, r)));
    parts.into_iter().map(move |(kind, r)| {
        let data = match kind {
            TableKind::Rows => encode(&tables.lr[r.clone()]),
            TableKind::Cols => encode(&tables.lc[r.clone()]),
            TableKind::Counts => encode(&tables.counts[r.clone()]),
            _ => encode(&cells[r.clone()]),
        };
        v1::TableChunk {
            kind: kind as i32,
            offset: r.start as u64,
            data,
            ..head.clone()
        }
    })
}

/// The chunks of one push of sparse tables: `part`'s arrays (none in a last push
/// without a part) and `cells` (rank 0's current allocation in its last push; empty
/// otherwise), each a copy of `head` with the part's figures and its piece. One chunk
/// at least: a push without a part or cells is its head alone.
pub fn sparse_chunks(
    part: Option<SparsePart>,
    cells: Vec<u32>,
    mut head: v1::SparseChunk,
) -> impl Iterator<Item = v1::SparseChunk> + Send + 'static {
    use v1::SparseKind as K;
    let mut parts: Vec<(K, std::ops::Range<usize>)> = Vec::new();
    if let Some(p) = &part {
        let t = &p.tables;
        head.start = p.start as u64;
        head.words = t.vocab as u64;
        head.k_rows = t.k_rows as u64;
        head.k_cols = t.k_cols as u64;
        head.before = p.figures.before;
        head.before_discounted = p.figures.before_discounted;
        head.lower_bound = p.figures.lower_bound;
        parts.extend(pieces::<u32>(t.row_idx.len()).map(|r| (K::RowIdx, r)));
        parts.extend(pieces::<f32>(t.row_loss.len()).map(|r| (K::RowLoss, r)));
        parts.extend(pieces::<u32>(t.col_idx.len()).map(|r| (K::ColIdx, r)));
        parts.extend(pieces::<f32>(t.col_loss.len()).map(|r| (K::ColLoss, r)));
        parts.extend(pieces::<f64>(t.row_sum.len()).map(|r| (K::RowSum, r)));
        parts.extend(pieces::<f64>(t.col_sum.len()).map(|r| (K::ColSum, r)));
        parts.extend(pieces::<u64>(p.counts.len()).map(|r| (K::Counts, r)));
    }
    parts.extend(pieces::<u32>(cells.len()).map(|r| (K::Cells, r)));
    if parts.is_empty() {
        // The head alone, as a chunk of no elements.
        parts.push((K::Counts, 0..0));
    }
    parts.into_iter().map(move |(kind, r)| {
        let data = match (&part, kind) {
            (_, K::Cells) => encode(&cells[r.clone()]),
            (None, _) => Vec::new(),
            (Some(p), k) => match k {
                K::RowIdx => encode(&p.tables.row_idx[r.clone()]),
                K::RowLoss => encode(&p.tables.row_loss[r.clone()]),
                K::ColIdx => encode(&p.tables.col_idx[r.clone()]),
                K::ColLoss => encode(&p.tables.col_loss[r.clone()]),
                K::RowSum => encode(&p.tables.row_sum[r.clone()]),
                K::ColSum => encode(&p.tables.col_sum[r.clone()]),
                _ => encode(&p.counts[r.clone()]),
            },
        };
        v1::SparseChunk {
            kind: kind as i32,
            offset: r.start as u64,
            data,
            ..head.clone()
        }
    })
}

/// The chunks of a solved allocation: the cells and the word counts; the first carries
/// the round's report.
pub fn allocation_chunks(
    cells: &[u32],
    counts: &[u64],
    report: &Report,
) -> Vec<v1::AllocationChunk> {
    let v = cells.len() as u64;
    let mut chunks: Vec<v1::AllocationChunk> = pieces::<u32>(cells.len())
        .map(|r| (TableKind::Cells, encode(&cells[r.clone()]), r.start))
        .chain(
            pieces::<u64>(counts.len())
                .map(|r| (TableKind::Counts, encode(&counts[r.clone()]), r.start)),
        )
        .map(|(kind, data, offset)| v1::AllocationChunk {
            report: None,
            vocab: v,
            kind: kind as i32,
            offset: offset as u64,
            data,
        })
        .collect();
    if let Some(first) = chunks.first_mut() {
        first.report = Some(report_to_wire(report));
    }
    chunks
}

/// A solved allocation put back together from its chunks: every cell and count exactly
/// once, and the report.
pub struct AllocationAssembly {
    pub cells: Vec<u32>,
    pub counts: Vec<u64>,
    report: Option<Report>,
    got: [usize; 2],
}

impl AllocationAssembly {
    pub fn new(vocab: usize) -> Self {
        Self {
            cells: vec![0; vocab],
            counts: vec![0; vocab],
            report: None,
            got: [0; 2],
        }
    }

    pub fn add(&mut self, ch: v1::AllocationChunk) -> Result<()> {
        if let Some(r) = ch.report {
            self.report = Some(report_from_wire(r)?);
        }
        match TableKind::try_from(ch.kind) {
            Ok(TableKind::Cells) => {
                self.got[0] += decode_into(&mut self.cells, ch.offset, &ch.data)?
            }
            Ok(TableKind::Counts) => {
                self.got[1] += decode_into(&mut self.counts, ch.offset, &ch.data)?
            }
            _ => return Err(bad("allocation chunk", format!("kind {}", ch.kind))),
        }
        Ok(())
    }

    /// The cells, counts and report; an error unless every element came exactly once.
    pub fn finish(self) -> Result<(Vec<u32>, Vec<u64>, Report)> {
        let v = self.cells.len();
        if self.got != [v, v] {
            return Err(Error::Control(format!(
                "the allocation arrived incomplete ({} cells, {} counts of {v})",
                self.got[0], self.got[1]
            )));
        }
        let report = self
            .report
            .ok_or_else(|| Error::Control("the allocation arrived without its report".into()))?;
        Ok((self.cells, self.counts, report))
    }
}
