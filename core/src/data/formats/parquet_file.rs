//! Parquet: the string column named by the text field, read row group by row group with
//! ranged reads at the object's listed version, in windows of at least [`WINDOW`] bytes
//! (a page larger than that is read whole), so memory holds a window and a page, never
//! a row group or the file.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes};
use parquet::basic::Type as Physical;
use parquet::column::reader::{ColumnReader, get_typed_column_reader};
use parquet::data_type::ByteArrayType;
use parquet::file::reader::{ChunkReader, FileReader, Length};
use parquet::file::serialized_reader::SerializedFileReader;

use super::{Done, Object, Out, Piece, SkipReason, Stop};
use crate::Error;
use crate::data::options::{BadLines, TextOptions};

/// Rows read at a time.
const BATCH: usize = 1024;
/// The least fetched by a read outside the window kept.
const WINDOW: u64 = 8 << 20;
/// Bytes a page header may take.
const HEADER_ROOM: u64 = 1 << 20;

/// The object by ranges: one fetched window kept.
#[derive(Clone)]
struct Ranges(Arc<Inner>);

struct Inner {
    handle: tokio::runtime::Handle,
    obj: Object,
    raw: Arc<AtomicU64>,
    kept: Mutex<(u64, Bytes)>,
}

impl Ranges {
    fn fetch(&self, start: u64, end: u64) -> parquet::errors::Result<Bytes> {
        let me = &self.0;
        let b = me
            .handle
            .block_on(me.obj.loc.get_range_version(
                &me.obj.name,
                start..end,
                me.obj.e_tag.as_deref(),
            ))
            .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))?;
        me.raw.fetch_add(b.len() as u64, Ordering::Relaxed);
        *me.kept.lock().unwrap_or_else(|e| e.into_inner()) = (start, b.clone());
        Ok(b)
    }

    /// Bytes from `start` on, at least `len` of them, from the kept range or fetched.
    fn from(&self, start: u64, len: u64) -> parquet::errors::Result<Bytes> {
        {
            let kept = self.0.kept.lock().unwrap_or_else(|e| e.into_inner());
            let (at, b) = (kept.0, &kept.1);
            if start >= at && start + len <= at + b.len() as u64 {
                return Ok(b.slice((start - at) as usize..));
            }
        }
        let size = self.0.obj.size;
        if start + len > size {
            return Err(parquet::errors::ParquetError::EOF(format!(
                "{len} bytes at {start} are past the end of the file ({size} bytes)"
            )));
        }
        self.fetch(start, (start + len.max(WINDOW)).min(size))
    }
}

impl Length for Ranges {
    fn len(&self) -> u64 {
        self.0.obj.size
    }
}

impl ChunkReader for Ranges {
    type T = bytes::buf::Reader<Bytes>;

    /// A page header is read through this: at least [`HEADER_ROOM`] bytes from `start`
    /// are in the window it reads (headers with their statistics are far smaller).
    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        let room = HEADER_ROOM
            .min(self.0.obj.size.saturating_sub(start))
            .max(1);
        Ok(self.from(start, room)?.reader())
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        Ok(self.from(start, length as u64)?.slice(..length))
    }
}

/// Read the text column of a Parquet object and pass each row's text on.
pub(super) fn read(
    handle: tokio::runtime::Handle,
    obj: Object,
    opts: &TextOptions,
    raw: Arc<AtomicU64>,
    out: &Out,
) -> Done {
    let url = obj.url();
    let ranges = Ranges(Arc::new(Inner {
        handle,
        obj,
        raw,
        kept: Mutex::new((0, Bytes::new())),
    }));
    let bad = |what: String, e: parquet::errors::ParquetError| {
        let e = match e {
            parquet::errors::ParquetError::External(inner) => match inner.downcast::<Error>() {
                Ok(store) => return Stop::Failed(*store),
                Err(other) => other.to_string(),
            },
            e => e.to_string(),
        };
        Stop::Failed(Error::Data(format!(
            "{url}{what}: not a readable Parquet file: {e}"
        )))
    };
    let file = SerializedFileReader::new(ranges.clone()).map_err(|e| bad(String::new(), e))?;
    let meta = file.metadata();
    let schema = meta.file_metadata().schema_descr();
    let col = (0..schema.num_columns())
        .find(|&i| schema.column(i).path().string() == opts.text_field)
        .ok_or_else(|| {
            let names: Vec<String> = (0..schema.num_columns())
                .map(|i| schema.column(i).path().string())
                .collect();
            Stop::Failed(Error::Data(format!(
                "{url}: no column {:?} (text_field); its columns: {}",
                opts.text_field,
                names.join(", ")
            )))
        })?;
    let descr = schema.column(col);
    if descr.physical_type() != Physical::BYTE_ARRAY || descr.max_rep_level() > 0 {
        return Err(Stop::Failed(Error::Data(format!(
            "{url}: column {:?} is {}{}, not a string column",
            opts.text_field,
            descr.physical_type(),
            if descr.max_rep_level() > 0 {
                " (repeated)"
            } else {
                ""
            }
        ))));
    }
    let max_def = descr.max_def_level();
    let mut row = 0u64;
    for g in 0..meta.num_row_groups() {
        let at = format!(" row group {g}");
        let group = file.get_row_group(g).map_err(|e| bad(at.clone(), e))?;
        let reader = group
            .get_column_reader(col)
            .map_err(|e| bad(at.clone(), e))?;
        let ColumnReader::ByteArrayColumnReader(_) = &reader else {
            unreachable!("checked to be BYTE_ARRAY above");
        };
        let mut typed = get_typed_column_reader::<ByteArrayType>(reader);
        let (mut defs, mut values) = (Vec::new(), Vec::new());
        loop {
            defs.clear();
            values.clear();
            let (records, _, _) = typed
                .read_records(BATCH, (max_def > 0).then_some(&mut defs), None, &mut values)
                .map_err(|e| bad(at.clone(), e))?;
            if records == 0 {
                break;
            }
            let mut vals = values.iter();
            for k in 0..records {
                row += 1;
                let null = max_def > 0 && defs.get(k).is_some_and(|&d| d < max_def);
                let Some(v) = (!null).then(|| vals.next()).flatten() else {
                    if opts.bad_lines == BadLines::Skip {
                        out.send(Piece::Skipped(SkipReason::NoText, 0))?;
                        continue;
                    }
                    return Err(Stop::Failed(Error::Data(format!(
                        "{url} row {row}: column {:?} is null (bad_lines = \"skip\" leaves such rows out)",
                        opts.text_field
                    ))));
                };
                out.text(v.data(), row)?;
                if v.data().last() != Some(&b'\n') {
                    out.text(b"\n", row)?;
                }
            }
        }
    }
    Ok(())
}
