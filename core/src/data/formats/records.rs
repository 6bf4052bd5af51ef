//! The framings of a decompressed stream: plain text passed on in pieces, JSON lines
//! (the string at the text field of each), WET (the payload of each `conversion`
//! record).

use std::io::{BufRead, BufReader, Read};

use bytes::Bytes;

use super::field::field_text;
use super::{Counted, Done, Framing, Out, PIECE_BYTES, Piece, SkipReason, Stop, io_error};
use crate::data::options::{BadLines, TextOptions};
use crate::{Error, Result};

/// Longest WARC header line accepted.
const MAX_HEADER_LINE: usize = 64 << 10;

/// Pass the text of one stream (an object, or a member of an archive) to `out`. `broke`
/// says where the stream broke, given the decoded bytes before it.
pub(super) fn frame<R: Read>(
    r: &mut Counted<R>,
    url: &str,
    member: Option<&str>,
    framing: Framing,
    opts: &TextOptions,
    out: &Out,
    broke: &dyn Fn(u64) -> String,
) -> Done {
    let place = |rec: u64| match member {
        Some(m) => format!("{url} member {m} record {rec}"),
        None => format!("{url} record {rec}"),
    };
    match framing {
        Framing::Text => text(r, out, broke),
        Framing::Jsonl => jsonl(r, &place, opts, out, broke),
        Framing::Wet => wet(r, &place, out, broke),
        Framing::Parquet => Err(Stop::Failed(Error::Data(format!(
            "{}: a Parquet file is read by ranges, not as a stream",
            place(0)
        )))),
    }
}

fn text<R: Read>(r: &mut Counted<R>, out: &Out, broke: &dyn Fn(u64) -> String) -> Done {
    loop {
        let mut buf = vec![0u8; PIECE_BYTES];
        let mut n = 0;
        let mut end = false;
        while n < buf.len() {
            match r.read(&mut buf[n..]) {
                Ok(0) => {
                    end = true;
                    break;
                }
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error(e, || broke(r.n)).into()),
            }
        }
        if n > 0 {
            buf.truncate(n);
            out.send(Piece::Text(Bytes::from(buf), Vec::new()))?;
        }
        if end {
            return Ok(());
        }
    }
}

/// One line of a buffered stream, at most `max` bytes kept.
enum Line {
    End,
    Whole,
    /// Longer than the limit: read past, its bytes.
    TooLong(u64),
}

fn bounded_line<R: BufRead>(r: &mut R, max: usize, out: &mut Vec<u8>) -> std::io::Result<Line> {
    out.clear();
    let (mut total, mut too_long, mut any) = (0u64, false, false);
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(match (any, too_long) {
                (false, _) => Line::End,
                (true, true) => Line::TooLong(total),
                (true, false) => Line::Whole,
            });
        }
        any = true;
        let (part, found) = match memchr::memchr(b'\n', buf) {
            Some(i) => (&buf[..i], true),
            None => (buf, false),
        };
        if !too_long && out.len() + part.len() > max {
            too_long = true;
            out.clear();
        }
        if !too_long {
            out.extend_from_slice(part);
        }
        let used = part.len() + found as usize;
        total += used as u64;
        r.consume(used);
        if found {
            return Ok(if too_long {
                Line::TooLong(total)
            } else {
                Line::Whole
            });
        }
    }
}

/// A record without text: counted in skip mode, else the error.
fn no_text(opts: &TextOptions, out: &Out, why: SkipReason, bytes: u64, msg: String) -> Done {
    if opts.bad_lines == BadLines::Skip {
        return out.send(Piece::Skipped(why, bytes));
    }
    Err(Stop::Failed(Error::Data(format!(
        "{msg} (bad_lines = \"skip\" leaves such records out)"
    ))))
}

fn jsonl<R: Read>(
    r: &mut Counted<R>,
    place: &dyn Fn(u64) -> String,
    opts: &TextOptions,
    out: &Out,
    broke: &dyn Fn(u64) -> String,
) -> Done {
    let path: Vec<&str> = opts.text_field.split('.').collect();
    let mut br = BufReader::with_capacity(256 << 10, r);
    let (mut line, mut rec) = (Vec::new(), 0u64);
    loop {
        let got = bounded_line(&mut br, opts.max_line_bytes, &mut line)
            .map_err(|e| io_error(e, || broke(br.get_ref().n)))?;
        rec += 1;
        match got {
            Line::End => return Ok(()),
            Line::TooLong(bytes) => no_text(
                opts,
                out,
                SkipReason::TooLong,
                bytes,
                format!(
                    "{}: longer than the limit of {} bytes (max_line_bytes)",
                    place(rec),
                    opts.max_line_bytes
                ),
            )?,
            Line::Whole if line.trim_ascii().is_empty() => {}
            Line::Whole => match field_text(&line, &path) {
                Ok(mut text) => {
                    if !text.ends_with('\n') {
                        text.push('\n');
                    }
                    out.text(text.as_bytes(), rec)?;
                }
                Err(why) => no_text(
                    opts,
                    out,
                    SkipReason::NoText,
                    line.len() as u64 + 1,
                    format!("{}: {why}", place(rec)),
                )?,
            },
        }
    }
}

/// A WARC header's Content-Length and whether it is a `conversion` record; None at the
/// end of the stream.
fn warc_header<R: BufRead>(
    br: &mut R,
    line: &mut Vec<u8>,
    at: &dyn Fn(&mut R) -> String,
) -> Result<Option<(u64, bool)>> {
    let mut started = false;
    let (mut len, mut conversion) = (None, false);
    loop {
        let got = bounded_line(br, MAX_HEADER_LINE, line).map_err(|e| io_error(e, || at(br)))?;
        let l = line.strip_suffix(b"\r").unwrap_or(line);
        match got {
            Line::End if !started => return Ok(None),
            Line::End => return Err(Error::Data(format!("{}: cut short in its header", at(br)))),
            Line::TooLong(_) => {
                return Err(Error::Data(format!(
                    "{}: a header line over {MAX_HEADER_LINE} bytes",
                    at(br)
                )));
            }
            Line::Whole if !started && l.is_empty() => {}
            Line::Whole if !started => {
                if !l.starts_with(b"WARC/") {
                    return Err(Error::Data(format!(
                        "{}: not a WARC record header: {:?}",
                        at(br),
                        String::from_utf8_lossy(&l[..l.len().min(40)])
                    )));
                }
                started = true;
            }
            Line::Whole if l.is_empty() => {
                let len = len.ok_or_else(|| {
                    Error::Data(format!("{}: no Content-Length in its header", at(br)))
                })?;
                return Ok(Some((len, conversion)));
            }
            Line::Whole => {
                let l = String::from_utf8_lossy(l);
                if let Some((k, v)) = l.split_once(':') {
                    let (k, v) = (k.trim(), v.trim());
                    if k.eq_ignore_ascii_case("content-length") {
                        len = Some(v.parse::<u64>().map_err(|_| {
                            Error::Data(format!("{}: Content-Length {v:?}", at(br)))
                        })?);
                    } else if k.eq_ignore_ascii_case("warc-type") {
                        conversion = v == "conversion";
                    }
                }
            }
        }
    }
}

fn wet<R: Read>(
    r: &mut Counted<R>,
    place: &dyn Fn(u64) -> String,
    out: &Out,
    broke: &dyn Fn(u64) -> String,
) -> Done {
    let mut br = BufReader::with_capacity(256 << 10, r);
    let (mut line, mut rec) = (Vec::new(), 0u64);
    loop {
        rec += 1;
        let at = |b: &mut BufReader<&mut Counted<R>>| {
            format!("{} (decoded byte {})", place(rec), b.get_ref().n)
        };
        let Some((len, conversion)) = warc_header(&mut br, &mut line, &at)? else {
            return Ok(());
        };
        let (mut left, mut last) = (len, b'\n');
        while left > 0 {
            let buf = match br.fill_buf() {
                Ok(b) => b,
                Err(e) => {
                    let n = br.get_ref().n;
                    return Err(io_error(e, || broke(n)).into());
                }
            };
            if buf.is_empty() {
                return Err(Stop::Failed(Error::Data(format!(
                    "{}: cut short: Content-Length {len}, {} bytes present",
                    place(rec),
                    len - left
                ))));
            }
            let k = (buf.len() as u64).min(left).min(PIECE_BYTES as u64) as usize;
            if conversion {
                last = buf[k - 1];
                out.text(&buf[..k], rec)?;
            }
            br.consume(k);
            left -= k as u64;
        }
        if conversion && len > 0 && last != b'\n' {
            out.text(b"\n", rec)?;
        }
    }
}
