//! Inputs as they come: compressed streams (gzip, also of many members; zstd; xz;
//! bzip2), tar archives, JSON lines, Parquet and WET, decoded into text that
//! [`super::text::LineReader`] reads line by line with the checks a plain file gets.
//!
//! An object's format comes from its name (`news.en-00001-of-00100` is text,
//! `c4-train.00000-of-01024.json.gz` JSON lines in gzip, `1b.tar.gz` a tar archive in
//! gzip, `CC-MAIN-....warc.wet.gz` WET, `part-0.parquet` Parquet), or from
//! [`TextOptions::format`](super::options::TextOptions) for every input. A tar archive's
//! members are read in the archive's order, each by its own name (a member may be
//! compressed itself), each a source of its own.
//!
//! Decoding runs on a blocking thread per input, beside the task that tokenises, and
//! hands decoded text over a small bounded channel ([`Piece`]s): memory stays constant
//! whatever the object's size. The object is read at the version it was listed at, as
//! plain text is; a corrupt or truncated stream is an error naming the object, the
//! compressed byte reached and the decoded bytes before it, never a short corpus.

mod field;
mod parquet_file;
mod records;
#[cfg(test)]
pub(crate) mod tests;

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::mpsc;

use super::options::TextOptions;
use super::store::Location;
use crate::{Error, Result};

/// How an object's bytes are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    None,
    Gzip,
    Zstd,
    Xz,
    Bzip2,
}

/// What the decompressed bytes hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// Lines of text.
    Text,
    /// One JSON object per line; the text is a string field.
    Jsonl,
    /// WARC records; the text is the payload of each `conversion` record.
    Wet,
    /// A Parquet file; the text is a string column.
    Parquet,
}

/// An input's format: compression, whether a tar archive, and what the text is in (for
/// an archive, each member has a format of its own, from its name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Format {
    pub codec: Codec,
    pub tar: bool,
    pub framing: Framing,
}

const CODECS: [(&str, Codec); 6] = [
    (".gz", Codec::Gzip),
    (".gzip", Codec::Gzip),
    (".zst", Codec::Zstd),
    (".zstd", Codec::Zstd),
    (".xz", Codec::Xz),
    (".bz2", Codec::Bzip2),
];
const TARS: [(&str, Codec); 5] = [
    (".tgz", Codec::Gzip),
    (".tbz2", Codec::Bzip2),
    (".tbz", Codec::Bzip2),
    (".txz", Codec::Xz),
    (".tzst", Codec::Zstd),
];
const FRAMINGS: [(&str, Framing); 6] = [
    (".jsonl", Framing::Jsonl),
    (".ndjson", Framing::Jsonl),
    (".json", Framing::Jsonl),
    (".wet", Framing::Wet),
    (".parquet", Framing::Parquet),
    (".pq", Framing::Parquet),
];

impl Format {
    pub const TEXT: Format = Format {
        codec: Codec::None,
        tar: false,
        framing: Framing::Text,
    };

    /// The format an object's name says (plain text when it says nothing known).
    pub fn of_name(name: &str) -> Format {
        let base = name.rsplit('/').next().unwrap_or(name).to_ascii_lowercase();
        let mut rest = base.as_str();
        let mut f = Format::TEXT;
        if let Some((_, c)) = TARS.iter().find(|(s, _)| rest.ends_with(s)) {
            return Format {
                codec: *c,
                tar: true,
                framing: Framing::Text,
            };
        }
        if let Some((s, c)) = CODECS.iter().find(|(s, _)| rest.ends_with(s)) {
            f.codec = *c;
            rest = &rest[..rest.len() - s.len()];
        }
        if let Some(r) = rest.strip_suffix(".tar") {
            f.tar = true;
            rest = r;
        }
        if !f.tar
            && let Some((_, fr)) = FRAMINGS.iter().find(|(s, _)| rest.ends_with(s))
        {
            f.framing = *fr;
        }
        f
    }

    /// A format as `--format` names it: the suffixes of a name without their dots, such
    /// as `text`, `text.gz`, `jsonl.zst`, `tar.gz`, `wet.gz` or `parquet`.
    pub fn parse(s: &str) -> Result<Format> {
        // Each part and what it stands for.
        const KNOWN: &[(&str, &str)] = &[
            ("text", "text"),
            ("txt", "text"),
            ("jsonl", "jsonl"),
            ("ndjson", "jsonl"),
            ("json", "jsonl"),
            ("wet", "wet"),
            ("parquet", "parquet"),
            ("pq", "parquet"),
            ("tar", "tar"),
            ("gz", "gz"),
            ("gzip", "gz"),
            ("zst", "zst"),
            ("zstd", "zst"),
            ("xz", "xz"),
            ("bz2", "bz2"),
            ("tgz", "tar.gz"),
            ("tbz2", "tar.bz2"),
            ("txz", "tar.xz"),
            ("tzst", "tar.zst"),
        ];
        let canonical: Option<Vec<&str>> = s
            .split('.')
            .map(|p| KNOWN.iter().find(|(k, _)| *k == p).map(|(_, c)| *c))
            .collect();
        let f = Format::of_name(&format!("input.{s}"));
        // In the order a name has them: what the text is in, or tar; then compression.
        if canonical.is_none_or(|c| c.join(".") != f.name()) {
            return Err(Error::Config(format!(
                "format {s:?}: expected text, jsonl, wet, parquet or tar, then .gz, .zst, .xz or .bz2 \
                 for compression (e.g. jsonl.zst, tar.gz)"
            )));
        }
        f.check()?;
        Ok(f)
    }

    /// Formats that cannot be read as a stream are refused.
    pub fn check(&self) -> Result<()> {
        if self.framing == Framing::Parquet && self.codec != Codec::None {
            return Err(Error::Config(format!(
                "format {}: a Parquet file is read by row group from its footer, so it must be an object of its own, \
                 not compressed as a whole (its pages carry their own compression)",
                self.name()
            )));
        }
        Ok(())
    }

    /// Plain text, read directly without a decoding thread.
    pub fn is_plain(&self) -> bool {
        *self == Format::TEXT
    }

    /// The format's name, as `--format` takes it and manifests record it.
    pub fn name(&self) -> String {
        let mut s = String::from(match (self.tar, self.framing) {
            (true, _) => "tar",
            (_, Framing::Text) => "text",
            (_, Framing::Jsonl) => "jsonl",
            (_, Framing::Wet) => "wet",
            (_, Framing::Parquet) => "parquet",
        });
        s.push_str(match self.codec {
            Codec::None => "",
            Codec::Gzip => ".gz",
            Codec::Zstd => ".zst",
            Codec::Xz => ".xz",
            Codec::Bzip2 => ".bz2",
        });
        s
    }
}

/// Why a record was left out with `bad_lines = "skip"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// A JSON line that is not JSON, or has no string at the text field; a Parquet row
    /// whose text is null.
    NoText,
    /// A JSON line longer than `max_line_bytes`.
    TooLong,
}

/// What a decoding thread hands the line reader.
#[derive(Debug)]
pub enum Piece {
    /// A tar member begins: its name in the archive and its format.
    Member(String, Format),
    /// Decoded text, and for record formats where each record's text ends: (end
    /// offset, record number: the JSON line's, the Parquet row's, the WET record's),
    /// so each line is known by its record; none for plain text.
    Text(Bytes, Marks),
    /// A record left out (skip mode): why, its bytes.
    Skipped(SkipReason, u64),
    /// The object was decoded to its end (a channel closed without it is an error).
    End,
}

/// An object being decoded on its own thread.
pub struct Decoding {
    pub pieces: mpsc::Receiver<Result<Piece>>,
    /// Bytes of the object read so far (what progress counts).
    pub raw_read: Arc<AtomicU64>,
}

/// The object to decode, at the version it was listed at.
#[derive(Clone, Debug)]
pub struct Object {
    pub loc: Location,
    pub name: String,
    pub size: u64,
    pub e_tag: Option<String>,
}

impl Object {
    fn url(&self) -> String {
        self.loc.url_of(&self.name)
    }
}

/// Pieces in flight between a decoding thread and its reader.
const IN_FLIGHT: usize = 8;
/// Bytes of plain text per piece.
const PIECE_BYTES: usize = 256 << 10;

/// Start decoding `obj` as `format` on a blocking thread. `chunks` is the object's
/// stream at its version (not used for Parquet, which is read by ranges).
pub fn spawn(
    obj: Object,
    format: Format,
    chunks: Option<BoxStream<'static, Result<Bytes>>>,
    opts: &TextOptions,
) -> Decoding {
    let (tx, rx) = mpsc::channel(IN_FLIGHT);
    let raw_read = Arc::new(AtomicU64::new(0));
    let (opts, raw) = (opts.clone(), raw_read.clone());
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let out = Out::new(tx.clone());
        let url = obj.url();
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            match (format.framing, chunks) {
                (Framing::Parquet, _) if !format.tar => {
                    parquet_file::read(handle, obj, &opts, raw, &out)
                }
                (_, Some(chunks)) => {
                    let raw = BlockingRead {
                        handle,
                        chunks,
                        chunk: Bytes::new(),
                        read: raw,
                        size: obj.size,
                        url: obj.url(),
                    };
                    decode(raw, &obj.url(), format, &opts, &out)
                }
                (_, None) => Err(Stop::Failed(Error::Data(format!(
                    "{}: no stream to decode",
                    obj.url()
                )))),
            }
        }));
        // A decoder that panics (a library's assertion on a hostile file) is an error
        // naming the object, never a short read.
        let r = decoded.unwrap_or_else(|panic| {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            Err(Stop::Failed(Error::Data(format!(
                "{url}: its decoder failed: {why}"
            ))))
        });
        match r {
            Ok(()) => {
                let _ = out.send(Piece::End);
            }
            Err(Stop::Closed) => {}
            Err(Stop::Failed(e)) => {
                let _ = tx.blocking_send(Err(e));
            }
        }
    });
    Decoding {
        pieces: rx,
        raw_read,
    }
}

/// Where each record's text ends in a piece, and the record's number.
pub type Marks = Vec<(usize, u64)>;

/// Why decoding ended early.
pub(crate) enum Stop {
    /// The reader is gone (it failed or stopped): nothing more to do.
    Closed,
    Failed(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Failed(e)
    }
}

type Done = std::result::Result<(), Stop>;

/// The sending end, from the blocking thread: records' text is gathered into pieces of
/// about [`PIECE_BYTES`] (a piece per short record would cost a wake-up each).
pub(crate) struct Out {
    tx: mpsc::Sender<Result<Piece>>,
    batch: std::cell::RefCell<(Vec<u8>, Marks)>,
}

impl Out {
    fn new(tx: mpsc::Sender<Result<Piece>>) -> Self {
        Out {
            tx,
            batch: Default::default(),
        }
    }

    /// Send a piece, after the text gathered so far.
    fn send(&self, p: Piece) -> Done {
        self.flush()?;
        self.tx.blocking_send(Ok(p)).map_err(|_| Stop::Closed)
    }

    /// Text of `record`: whole lines (a long record may come in parts, in order).
    fn text(&self, text: &[u8], record: u64) -> Done {
        let full = {
            let mut b = self.batch.borrow_mut();
            b.0.extend_from_slice(text);
            let end = b.0.len();
            match b.1.last_mut() {
                Some(m) if m.1 == record => m.0 = end,
                _ => b.1.push((end, record)),
            }
            end >= PIECE_BYTES
        };
        if full { self.flush() } else { Ok(()) }
    }

    fn flush(&self) -> Done {
        let (buf, marks) = std::mem::take(&mut *self.batch.borrow_mut());
        if buf.is_empty() {
            return Ok(());
        }
        let piece = Piece::Text(Bytes::from(buf), marks);
        self.tx.blocking_send(Ok(piece)).map_err(|_| Stop::Closed)
    }
}

/// The object's chunks as a `Read`, counting the bytes read and checking, at the end,
/// that the object still has the size it was listed with.
struct BlockingRead {
    handle: tokio::runtime::Handle,
    chunks: BoxStream<'static, Result<Bytes>>,
    chunk: Bytes,
    read: Arc<AtomicU64>,
    size: u64,
    url: String,
}

impl Read for BlockingRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.handle.block_on(self.chunks.next()) {
                Some(Ok(c)) => self.chunk = c,
                Some(Err(e)) => return Err(std::io::Error::other(e)),
                None => {
                    let read = self.read.load(Ordering::Relaxed);
                    if read != self.size {
                        return Err(std::io::Error::other(Error::Data(format!(
                            "{} changed while it was read ({} bytes listed, {read} read): the input must not change while a job reads it",
                            self.url, self.size
                        ))));
                    }
                    return Ok(0);
                }
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        let _ = self.chunk.split_to(n);
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Counts the bytes a decoder has produced (for error messages).
struct Counted<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

/// The decompressing reader of `codec` over `r`.
fn decompress<'a, R: Read + 'a>(codec: Codec, r: R) -> std::io::Result<Box<dyn Read + 'a>> {
    let r = std::io::BufReader::with_capacity(128 << 10, r);
    Ok(match codec {
        Codec::None => Box::new(r),
        // Every member: WET files and `cat a.gz b.gz` are gzip streams of many members.
        Codec::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(r)),
        Codec::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(r)?),
        Codec::Xz => Box::new(liblzma::bufread::XzDecoder::new_multi_decoder(r)),
        Codec::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(r)),
    })
}

/// An I/O error of a decoding pipeline as our error: the store's own errors (a failed
/// read, an object that changed) as they are, a decoder's naming where it broke.
pub(crate) fn io_error(e: std::io::Error, what: impl FnOnce() -> String) -> Error {
    if e.get_ref().is_some_and(|i| i.is::<Error>()) {
        match e.into_inner().map(|i| i.downcast::<Error>()) {
            Some(Ok(inner)) => return *inner,
            Some(Err(other)) => return Error::Data(format!("{}: {other}", what())),
            None => unreachable!("checked above"),
        }
    }
    Error::Data(format!("{}: {e}", what()))
}

/// Decode a stream: decompress, then read it as an archive or as one framing.
fn decode(raw: BlockingRead, url: &str, format: Format, opts: &TextOptions, out: &Out) -> Done {
    let read = raw.read.clone();
    let codec = format.codec;
    // Where a stream broke: the compressed byte reached, the decoded bytes before it.
    let broke = |label: &str, decoded: u64| {
        let stream = match codec {
            Codec::None => "",
            Codec::Gzip => "gzip ",
            Codec::Zstd => "zstd ",
            Codec::Xz => "xz ",
            Codec::Bzip2 => "bzip2 ",
        };
        format!(
            "{label}: the {stream}stream is corrupt or cut short (object byte {}, after {decoded} decoded bytes)",
            read.load(Ordering::Relaxed)
        )
    };
    let mut r = Counted {
        inner: decompress(codec, raw).map_err(|e| io_error(e, || broke(url, 0)))?,
        n: 0,
    };
    if !format.tar {
        return records::frame(&mut r, url, None, format.framing, opts, out, &|n| {
            broke(url, n)
        });
    }
    let mut archive = tar::Archive::new(&mut r);
    // Past the end-of-archive blocks to the end of the stream: archives concatenated
    // (`cat a.tar.gz b.tar.gz`) are read whole, and the stream's end is checked (its
    // gzip trailer, the object's size).
    archive.set_ignore_zeros(true);
    let entries = archive
        .entries()
        .map_err(|e| io_error(e, || format!("{url}: not a tar archive")))?;
    let mut members = 0u64;
    for entry in entries {
        let entry = entry.map_err(|e| {
            io_error(e, || {
                format!(
                    "{url}: a tar header: the archive is corrupt or cut short (object byte {})",
                    read.load(Ordering::Relaxed)
                )
            })
        })?;
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind == tar::EntryType::Continuous) {
            continue;
        }
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        if let Some(prefix) = &opts.members
            && !name.starts_with(prefix.as_str())
        {
            continue;
        }
        let inner = Format::of_name(&name);
        if inner.tar || inner.framing == Framing::Parquet {
            return Err(Stop::Failed(Error::Data(format!(
                "{url} member {name}: a {} inside a tar archive cannot be streamed; extract it to an object of its own",
                inner.name()
            ))));
        }
        members += 1;
        out.send(Piece::Member(name.clone(), inner))?;
        let at = format!("{url} member {name}");
        let mut m = Counted {
            inner: decompress(inner.codec, entry).map_err(|e| io_error(e, || broke(&at, 0)))?,
            n: 0,
        };
        records::frame(&mut m, url, Some(&name), inner.framing, opts, out, &|n| {
            broke(&at, n)
        })?;
    }
    if members == 0 {
        return Err(Stop::Failed(Error::Data(match &opts.members {
            Some(p) => format!("{url}: no file in the archive has a name that starts with {p:?}"),
            None => format!("{url}: the archive holds no file"),
        })));
    }
    Ok(())
}
