//! Text input: lines of whitespace-separated words, `<eos>` after every line (the
//! word_language_model convention, and how perplexities on PTB are counted).
//!
//! Text is streamed from object storage chunk by chunk; a line is never longer in memory
//! than `max_line_bytes`, whatever the object holds (a multi-gigabyte line is read past in
//! constant memory). Bad lines (bytes that are not UTF-8, control bytes such as NUL, a
//! line over the limit) are an error that names the object and the line, or, with
//! `bad_lines = "skip"`, skipped and counted by reason. An empty object is an error, and
//! an object is read only at the version (size and ETag) it had when it was listed, so a
//! corpus replaced under a running job is refused rather than read half old, half new.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use super::formats::{self, Format, Framing, Piece, SkipReason};
pub use super::options::{BadLines, TextOptions};
use super::store::Location;
use crate::{Error, Result};

/// End of a line (counted as a word, as in PTB perplexities).
pub const EOS: &str = "<eos>";
/// Any word outside the vocabulary.
pub const UNK: &str = "<unk>";

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Lines left out with `bad_lines = "skip"`, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// Lines holding bytes that are not UTF-8.
    pub invalid_utf8: u64,
    /// Lines holding a control byte (NUL, or any other below 0x20 but tab, LF, VT, FF,
    /// CR; or DEL).
    pub control_bytes: u64,
    /// Lines longer than `max_line_bytes`.
    pub too_long: u64,
    /// Bytes of all skipped lines.
    pub bytes: u64,
    /// Records without text: JSON lines that are not JSON objects or have no string at
    /// the text field, null Parquet values.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub no_text: u64,
}

impl Skipped {
    pub fn lines(&self) -> u64 {
        self.invalid_utf8 + self.control_bytes + self.too_long + self.no_text
    }

    pub fn add(&mut self, o: &Skipped) {
        self.invalid_utf8 += o.invalid_utf8;
        self.control_bytes += o.control_bytes;
        self.too_long += o.too_long;
        self.bytes += o.bytes;
        self.no_text += o.no_text;
    }
}

/// A control byte that has no business in text (whitespace controls are fine).
fn is_control(b: u8) -> bool {
    (b < 0x20 && !matches!(b, b'\t' | b'\n' | 0x0b | 0x0c | b'\r')) || b == 0x7f
}

/// Reads one text object line by line: plain text directly, any other format through
/// its decoding thread ([`super::formats`]). An archive is read member by member
/// ([`LineReader::next_source`]).
pub struct LineReader {
    url: String,
    pieces: BoxStream<'static, Result<Piece>>,
    chunk: bytes::Bytes,
    at: usize,
    pending: Vec<u8>,
    /// Physical lines seen (returned and skipped).
    line_no: u64,
    /// Lines returned.
    lines: u64,
    bytes: u64,
    /// Bytes of the line being read, with its newline.
    line_bytes: u64,
    /// Size of the object at the version being read, checked at the end (plain text;
    /// a decoding thread checks it itself).
    size: Option<u64>,
    max: usize,
    lowercase: bool,
    bad: BadLines,
    skipped: Skipped,
    /// The current source (the object, or an archive's member) is read to its end.
    done: bool,
    format: Format,
    /// The archive member being read, and the next one, once seen.
    member: Option<(String, Format)>,
    next_member: Option<(String, Format)>,
    /// The record the line read last is from (0: not a record format), from the marks
    /// of the chunk: where each record's text ends in it.
    record: u64,
    marks: formats::Marks,
    mark: usize,
    /// Bytes of the object read by its decoding thread.
    raw_read: Option<Arc<AtomicU64>>,
    /// The decoding thread said it reached the end.
    end_seen: bool,
    sources: u64,
}

impl LineReader {
    /// Open object `name` at its current version.
    pub async fn open(loc: &Location, name: &str, opts: &TextOptions) -> Result<Self> {
        Self::open_version(loc, name, opts, None).await
    }

    /// Open object `name`, which must still be the version (`size`, ETag) seen when it
    /// was listed; `None` takes the current version. Its format is the one
    /// `opts.format` names, else the one its name says.
    pub async fn open_version(
        loc: &Location,
        name: &str,
        opts: &TextOptions,
        expect: Option<(u64, Option<&str>)>,
    ) -> Result<Self> {
        let url = loc.url_of(name);
        let format = match &opts.format {
            Some(f) => Format::parse(f)?,
            None => Format::of_name(name),
        };
        format.check()?;
        let meta = loc
            .head(name)
            .await?
            .ok_or_else(|| Error::NotFound(url.clone()))?;
        if let Some((size, tag)) = expect
            && (meta.size != size || (tag.is_some() && meta.e_tag.as_deref() != tag))
        {
            return Err(Error::Data(format!(
                "{url} changed after it was listed ({size} bytes then, {} now): the input must not change while a job reads it",
                meta.size
            )));
        }
        if meta.size == 0 {
            return Err(Error::Data(format!("{url} is empty")));
        }
        let (pieces, raw_read, size) = if format.is_plain() {
            let chunks = loc.stream_version(name, meta.e_tag.as_deref()).await?;
            let pieces = chunks
                .map(|c| c.map(|b| Piece::Text(b, Vec::new())))
                .boxed();
            (pieces, None, Some(meta.size))
        } else {
            let chunks = if format.framing == Framing::Parquet {
                None
            } else {
                Some(loc.stream_version(name, meta.e_tag.as_deref()).await?)
            };
            let obj = formats::Object {
                loc: loc.clone(),
                name: name.to_string(),
                size: meta.size,
                e_tag: meta.e_tag.clone(),
            };
            let d = formats::spawn(obj, format, chunks, opts);
            let pieces = futures::stream::unfold(d.pieces, |mut rx| async {
                rx.recv().await.map(|p| (p, rx))
            })
            .boxed();
            (pieces, Some(d.raw_read), None)
        };
        Ok(Self {
            url,
            pieces,
            chunk: bytes::Bytes::new(),
            at: 0,
            pending: Vec::new(),
            line_no: 0,
            lines: 0,
            bytes: 0,
            line_bytes: 0,
            size,
            max: opts.max_line_bytes,
            lowercase: opts.lowercase,
            bad: opts.bad_lines,
            skipped: Skipped::default(),
            done: false,
            format,
            member: None,
            next_member: None,
            record: 0,
            marks: Vec::new(),
            mark: 0,
            raw_read,
            end_seen: false,
            sources: 0,
        })
    }

    /// Move to the next source: the object itself the first time, or an archive's next
    /// member (what was left of the current one is read past); false when none is left.
    /// Line numbers, counts and skips start again for each member.
    pub async fn next_source(&mut self) -> Result<bool> {
        self.sources += 1;
        if !self.format.tar {
            return Ok(self.sources == 1);
        }
        if self.sources == 1 {
            self.done = true;
            match self.pieces.next().await {
                Some(p) => self.take_piece(p?)?,
                None => {
                    return Err(Error::Data(format!(
                        "{}: its decoding stopped before the end of the object",
                        self.url
                    )));
                }
            }
        } else {
            let mut s = String::new();
            while self.next_line(&mut s).await? {}
        }
        let Some(next) = self.next_member.take() else {
            return Ok(false);
        };
        self.member = Some(next);
        self.chunk = bytes::Bytes::new();
        self.at = 0;
        (self.line_no, self.lines, self.bytes, self.record) = (0, 0, 0, 0);
        self.skipped = Skipped::default();
        self.done = false;
        Ok(true)
    }

    /// Take in a piece from the decoding thread: text becomes the chunk being read.
    fn take_piece(&mut self, p: Piece) -> Result<()> {
        match p {
            Piece::Text(b, marks) => {
                self.chunk = b;
                self.at = 0;
                self.marks = marks;
                self.mark = 0;
            }
            Piece::Skipped(why, bytes) => {
                match why {
                    SkipReason::NoText => self.skipped.no_text += 1,
                    SkipReason::TooLong => self.skipped.too_long += 1,
                }
                self.skipped.bytes += bytes;
            }
            Piece::Member(name, f) => {
                self.next_member = Some((name, f));
                self.done = true;
            }
            Piece::End => self.end_seen = true,
        }
        Ok(())
    }

    /// The archive member being read.
    pub fn member(&self) -> Option<&str> {
        self.member.as_ref().map(|(m, _)| m.as_str())
    }

    /// The format of the source being read, as manifests record it (`jsonl.zst`; an
    /// archive's member as `tar.gz:text`).
    pub fn format_name(&self) -> String {
        match &self.member {
            Some((_, f)) => format!("{}:{}", self.format.name(), f.name()),
            None => self.format.name(),
        }
    }

    /// Bytes of the object read so far (compressed bytes of a compressed object; the
    /// whole archive's): what progress counts.
    pub fn progress(&self) -> u64 {
        self.raw_read
            .as_ref()
            .map_or(self.bytes, |r| r.load(Ordering::Relaxed))
    }

    /// Where line `line` is, for messages: the object, the member, the record or line.
    fn place(&self, line: u64) -> String {
        let mut s = self.url.clone();
        if let Some((m, _)) = &self.member {
            s.push_str(&format!(" member {m}"));
        }
        if self.record > 0 {
            let what = match self.format.framing {
                Framing::Parquet => "row",
                _ => "record",
            };
            s.push_str(&format!(" {what} {}", self.record));
        } else {
            s.push_str(&format!(" line {line}"));
        }
        s
    }

    /// Physical number of the line last returned or skipped (1-based).
    pub fn line_no(&self) -> u64 {
        self.line_no
    }

    /// Lines returned so far (each one `<eos>`).
    pub fn lines(&self) -> u64 {
        self.lines
    }

    /// Lines skipped so far, by reason.
    pub fn skipped(&self) -> Skipped {
        self.skipped
    }

    /// Bytes of text consumed so far (decoded) in the current source.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Read the next usable line into `out` (without its newline); false at the end.
    pub async fn next_line(&mut self, out: &mut String) -> Result<bool> {
        loop {
            match self.raw_line().await? {
                None => return Ok(false),
                Some(None) => continue, // skipped
                Some(Some(())) => {
                    if self.take_line(out)? {
                        return Ok(true);
                    }
                }
            }
        }
    }

    /// The next physical line into `pending`: `None` at the end, `Some(None)` for an
    /// over-long line that was skipped, `Some(Some(()))` for a line in `pending`.
    async fn raw_line(&mut self) -> Result<Option<Option<()>>> {
        self.pending.clear();
        self.line_bytes = 0;
        // Reading past an over-long line (skip mode).
        let mut discarding = false;
        let mut found = false;
        while !found {
            if self.at == self.chunk.len() {
                if self.done {
                    break;
                }
                match self.pieces.next().await {
                    Some(p) => {
                        self.take_piece(p?)?;
                        continue;
                    }
                    None => {
                        self.done = true;
                        if self.raw_read.is_some() && !self.end_seen {
                            return Err(Error::Data(format!(
                                "{}: its decoding stopped before the end of the object",
                                self.url
                            )));
                        }
                        if let Some(size) = self.size
                            && self.bytes != size
                        {
                            return Err(Error::Data(format!(
                                "{} changed while it was read ({size} bytes listed, {} read): the input must not change while a job reads it",
                                self.url, self.bytes
                            )));
                        }
                        break;
                    }
                }
            }
            let rest = &self.chunk[self.at..];
            let part = match memchr::memchr(b'\n', rest) {
                Some(i) => {
                    found = true;
                    &rest[..i]
                }
                None => rest,
            };
            if !discarding && self.pending.len() + part.len() > self.max {
                if self.bad == BadLines::Error {
                    return Err(Error::Data(format!(
                        "{}: longer than the limit of {} bytes (max_line_bytes; bad_lines = \"skip\" leaves such lines out)",
                        self.place(self.line_no + 1),
                        self.max
                    )));
                }
                discarding = true;
                self.pending.clear();
            } else if !discarding {
                self.pending.extend_from_slice(part);
            }
            let used = (part.len() + found as usize) as u64;
            self.at += used as usize;
            self.bytes += used;
            self.line_bytes += used;
        }
        // The record of the line: the one whose text holds its last byte.
        if !self.marks.is_empty() {
            let last = self.at.saturating_sub(1);
            while self.mark + 1 < self.marks.len() && self.marks[self.mark].0 <= last {
                self.mark += 1;
            }
            self.record = self.marks[self.mark].1;
        }
        if discarding {
            self.line_no += 1;
            self.skipped.too_long += 1;
            self.skipped.bytes += self.line_bytes;
            return Ok(Some(None));
        }
        // At the end nothing is left; a last line without a newline is still a line.
        if !found && self.pending.is_empty() {
            return Ok(None);
        }
        Ok(Some(Some(())))
    }

    /// Check and decode the line in `pending` into `out`; false when it was skipped.
    fn take_line(&mut self, out: &mut String) -> Result<bool> {
        self.line_no += 1;
        if self.pending.last() == Some(&b'\r') {
            self.pending.pop();
        }
        let bad = if let Some(i) = self.pending.iter().position(|&b| is_control(b)) {
            Some((
                &mut self.skipped.control_bytes,
                format!(
                    "control byte 0x{:02x} at byte {} of the line",
                    self.pending[i],
                    i + 1
                ),
            ))
        } else if let Err(e) = std::str::from_utf8(&self.pending) {
            Some((
                &mut self.skipped.invalid_utf8,
                format!("invalid UTF-8 at byte {} of the line", e.valid_up_to() + 1),
            ))
        } else {
            None
        };
        if let Some((count, what)) = bad {
            if self.bad == BadLines::Error {
                return Err(Error::Data(format!(
                    "{}: {what} (bad_lines = \"skip\" leaves such lines out)",
                    self.place(self.line_no)
                )));
            }
            *count += 1;
            self.skipped.bytes += self.line_bytes;
            return Ok(false);
        }
        // Checked above.
        let s = std::str::from_utf8(&self.pending).unwrap_or_default();
        out.clear();
        if self.lowercase {
            out.push_str(&s.to_lowercase());
        } else {
            out.push_str(s);
        }
        self.lines += 1;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    async fn huge_lines(loc: &Location, opts: TextOptions) -> Result<Vec<String>> {
        let mut r = LineReader::open(loc, "huge.txt", &opts).await?;
        let (mut out, mut s) = (Vec::new(), String::new());
        while r.next_line(&mut s).await? {
            out.push(s.clone());
        }
        Ok(out)
    }

    async fn lines(content: &'static [u8], opts: TextOptions) -> Result<Vec<String>> {
        let loc = Location::parse("memory://text-tests").unwrap();
        let name = format!("f{}", content.len());
        loc.put(&name, Bytes::from_static(content)).await.unwrap();
        let mut r = LineReader::open(&loc, &name, &opts).await?;
        let mut out = Vec::new();
        let mut s = String::new();
        while r.next_line(&mut s).await? {
            out.push(s.clone());
        }
        Ok(out)
    }

    #[tokio::test]
    async fn splits_lines_and_keeps_a_last_unterminated_line() {
        let got = lines(
            b"a b\r\n\nC d e\nlast",
            TextOptions {
                lowercase: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(got, vec!["a b", "", "c d e", "last"]);
    }

    #[tokio::test]
    async fn rejects_bad_utf8_with_line_number() {
        let e = lines(b"fine\nbad \xff here\n", TextOptions::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("UTF-8"), "{e}");
    }

    #[tokio::test]
    async fn rejects_long_lines_and_empty_objects() {
        let e = lines(
            b"short\nthis line is too long\n",
            TextOptions {
                max_line_bytes: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 2") && e.contains("10 bytes"), "{e}");
        let e = lines(b"", TextOptions::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty"), "{e}");
        let loc = Location::parse("memory://text-tests").unwrap();
        assert!(matches!(
            LineReader::open(&loc, "missing", &TextOptions::default()).await,
            Err(Error::NotFound(_))
        ));
    }

    fn skip() -> TextOptions {
        TextOptions {
            bad_lines: BadLines::Skip,
            max_line_bytes: 10,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn control_bytes_are_an_error_or_a_counted_skip() {
        let e = lines(b"ok\nnul\x00inside\n", TextOptions::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 2") && e.contains("control byte 0x00"),
            "{e}"
        );
        // Whitespace controls are text.
        assert_eq!(
            lines(b"a\tb\x0bc\x0cd\r\n", TextOptions::default())
                .await
                .unwrap(),
            vec!["a\tb\x0bc\x0cd"]
        );
    }

    #[tokio::test]
    async fn skip_mode_leaves_bad_lines_out_and_counts_them_by_reason() {
        let loc = Location::parse("memory://text-tests").unwrap();
        let body: &'static [u8] =
            b"good one\nbad \xff\nnul\x00\nthis line is far too long\nesc\x1b[0m\n\nlast";
        loc.put("mixed", Bytes::from_static(body)).await.unwrap();
        let mut r = LineReader::open(&loc, "mixed", &skip()).await.unwrap();
        let (mut got, mut s) = (Vec::new(), String::new());
        while r.next_line(&mut s).await.unwrap() {
            got.push((r.line_no(), s.clone()));
        }
        assert_eq!(
            got,
            vec![
                (1, "good one".into()),
                (6, String::new()),
                (7, "last".into())
            ]
        );
        assert_eq!(r.lines(), 3);
        assert_eq!(
            r.skipped(),
            Skipped {
                invalid_utf8: 1,
                control_bytes: 2,
                too_long: 1,
                bytes: 6 + 5 + 26 + 8,
                no_text: 0,
            }
        );
        assert_eq!(r.bytes(), body.len() as u64);
    }

    #[tokio::test]
    async fn an_object_changed_since_listing_or_during_the_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::parse(dir.path().to_str().unwrap()).unwrap();
        let line = "word ".repeat(20) + "\n";
        let text = line.repeat(20_000); // 2 MB, read in many chunks
        loc.put("corpus.txt", Bytes::from(text.clone()))
            .await
            .unwrap();
        let m = loc.head("corpus.txt").await.unwrap().unwrap();
        let opts = TextOptions::default();
        // Listed at another size: refused before reading.
        let e = LineReader::open_version(&loc, "corpus.txt", &opts, Some((m.size + 1, None)))
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("changed after it was listed"), "{e}");
        // Cut short while being read (in place, same file): refused at the end.
        let mut r = LineReader::open_version(
            &loc,
            "corpus.txt",
            &opts,
            Some((m.size, m.e_tag.as_deref())),
        )
        .await
        .unwrap();
        let mut s = String::new();
        assert!(r.next_line(&mut s).await.unwrap());
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("corpus.txt"))
            .unwrap()
            .set_len(text.len() as u64 / 2)
            .unwrap();
        let e = loop {
            match r.next_line(&mut s).await {
                Ok(true) => continue,
                Ok(false) => panic!("a shortened object read to its end without an error"),
                Err(e) => break e.to_string(),
            }
        };
        assert!(e.contains("changed while it was read"), "{e}");
    }

    /// A line of several gigabytes (a sparse file: no disk used) is refused at the limit,
    /// or read past in constant memory and counted.
    #[tokio::test]
    async fn a_multi_gigabyte_line_is_bounded() {
        use std::io::{Seek, SeekFrom, Write};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.txt");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(b"first line\nstart of a huge line ").unwrap();
        let huge = 9u64 << 29; // 4.5 GiB
        f.seek(SeekFrom::Start(huge)).unwrap();
        f.write_all(b" end of it\nlast line\n").unwrap();
        drop(f);
        let loc = Location::parse(dir.path().to_str().unwrap()).unwrap();
        let e = huge_lines(&loc, TextOptions::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("1048576 bytes"), "{e}");
        let opts = TextOptions {
            bad_lines: BadLines::Skip,
            ..Default::default()
        };
        let mut r = LineReader::open(&loc, "huge.txt", &opts).await.unwrap();
        let (mut got, mut s) = (Vec::new(), String::new());
        while r.next_line(&mut s).await.unwrap() {
            got.push(s.clone());
            assert!(r.pending.capacity() <= 2 << 20, "a line was buffered whole");
        }
        assert_eq!(got, vec!["first line", "last line"]);
        assert_eq!(r.skipped().too_long, 1);
        assert_eq!(r.skipped().bytes, huge);
    }
}
