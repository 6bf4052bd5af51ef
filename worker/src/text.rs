//! Text input: lines of whitespace-separated words, `<eos>` after every line (the
//! word_language_model convention, and how perplexities on PTB are counted).
//!
//! Text is streamed from object storage chunk by chunk; a line is never longer in memory
//! than `max_line_bytes`. Bad input is an error that names the object and the line: bytes
//! that are not UTF-8, a line over the limit, an empty object.

use futures::StreamExt;
use futures::stream::BoxStream;

use crate::store::Location;
use crate::{Error, Result};

/// End of a line (counted as a word, as in PTB perplexities).
pub const EOS: &str = "<eos>";
/// Any word outside the vocabulary.
pub const UNK: &str = "<unk>";

/// How text is read.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TextOptions {
    pub lowercase: bool,
    /// Longest accepted line in bytes (without its newline).
    pub max_line_bytes: usize,
}

impl Default for TextOptions {
    fn default() -> Self {
        Self {
            lowercase: false,
            max_line_bytes: 1 << 20,
        }
    }
}

/// Reads one text object line by line.
pub struct LineReader {
    url: String,
    chunks: BoxStream<'static, Result<bytes::Bytes>>,
    chunk: bytes::Bytes,
    at: usize,
    pending: Vec<u8>,
    line_no: u64,
    bytes: u64,
    max: usize,
    lowercase: bool,
    done: bool,
}

impl LineReader {
    pub async fn open(loc: &Location, name: &str, opts: &TextOptions) -> Result<Self> {
        let url = loc.url_of(name);
        let meta = loc
            .head(name)
            .await?
            .ok_or_else(|| Error::NotFound(url.clone()))?;
        if meta.size == 0 {
            return Err(Error::Data(format!("{url} is empty")));
        }
        Ok(Self {
            url,
            chunks: loc.stream(name).await?,
            chunk: bytes::Bytes::new(),
            at: 0,
            pending: Vec::new(),
            line_no: 0,
            bytes: 0,
            max: opts.max_line_bytes,
            lowercase: opts.lowercase,
            done: false,
        })
    }

    /// Number of the line last returned (1-based).
    pub fn line_no(&self) -> u64 {
        self.line_no
    }

    /// Bytes consumed so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Read the next line into `out` (without its newline); false at the end.
    pub async fn next_line(&mut self, out: &mut String) -> Result<bool> {
        self.pending.clear();
        loop {
            if self.at == self.chunk.len() {
                if self.done {
                    break;
                }
                match self.chunks.next().await {
                    Some(c) => {
                        self.chunk = c?;
                        self.at = 0;
                        continue;
                    }
                    None => {
                        self.done = true;
                        break;
                    }
                }
            }
            let rest = &self.chunk[self.at..];
            let (part, found) = match rest.iter().position(|&b| b == b'\n') {
                Some(i) => (&rest[..i], true),
                None => (rest, false),
            };
            if self.pending.len() + part.len() > self.max {
                return Err(Error::Data(format!(
                    "{} line {}: longer than the limit of {} bytes (max_line_bytes)",
                    self.url,
                    self.line_no + 1,
                    self.max
                )));
            }
            self.pending.extend_from_slice(part);
            self.at += part.len() + found as usize;
            self.bytes += (part.len() + found as usize) as u64;
            if found {
                return self.finish_line(out).map(|_| true);
            }
        }
        if self.pending.is_empty() {
            return Ok(false);
        }
        // A last line without a newline is still a line.
        self.finish_line(out).map(|_| true)
    }

    fn finish_line(&mut self, out: &mut String) -> Result<()> {
        self.line_no += 1;
        if self.pending.last() == Some(&b'\r') {
            self.pending.pop();
        }
        let s = std::str::from_utf8(&self.pending).map_err(|e| {
            Error::Data(format!(
                "{} line {}: invalid UTF-8 at byte {} of the line",
                self.url,
                self.line_no,
                e.valid_up_to() + 1
            ))
        })?;
        out.clear();
        if self.lowercase {
            out.push_str(&s.to_lowercase());
        } else {
            out.push_str(s);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

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
}
