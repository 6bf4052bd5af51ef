//! Every format against the same text in plain form, and broken inputs of each kind.

use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;

use super::Format;
use crate::data::corpus::{SplitOut, build_vocab, expand_inputs, write_shards};
use crate::data::shards::Manifest;
use crate::data::store::Location;
use crate::data::text::{BadLines, LineReader, TextOptions};

/// A small corpus: documents of a few lines each, with non-ASCII words.
fn documents() -> Vec<String> {
    (0..60)
        .map(|d| {
            (0..1 + d % 4)
                .map(|l| format!("doc{d} line {l} wörd{} the café {}", d % 7, l * d % 5))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect()
}

fn plain(docs: &[String]) -> String {
    docs.iter().map(|d| format!("{d}\n")).collect()
}

pub(crate) fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

/// Two gzip members, as `cat a.gz b.gz` (and WET files) make.
fn gzip_members(b: &[u8]) -> Vec<u8> {
    let mut out = gzip(&b[..b.len() / 2]);
    out.extend(gzip(&b[b.len() / 2..]));
    out
}

fn zstd(b: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(b, 3).unwrap()
}

fn xz(b: &[u8]) -> Vec<u8> {
    let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

fn bzip2(b: &[u8]) -> Vec<u8> {
    let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

pub(crate) fn tar(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut t = tar::Builder::new(Vec::new());
    for (name, body) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        t.append_data(&mut h, name, *body).unwrap();
    }
    t.into_inner().unwrap()
}

fn jsonl(docs: &[String], field: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        let rec = match field {
            "text" => serde_json::json!({"id": i, "text": d, "meta": {"lang": "en"}}),
            _ => serde_json::json!({"id": i, "meta": {"body": d}}),
        };
        out.extend(serde_json::to_vec(&rec).unwrap());
        out.push(b'\n');
    }
    out
}

/// A Parquet file with an id column and a nullable text column, `per_group` rows per
/// row group, snappy pages.
pub(crate) fn parquet(texts: &[Option<&str>], per_group: usize) -> Vec<u8> {
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type(
            "message doc { required int64 id; optional binary text (UTF8); }",
        )
        .unwrap(),
    );
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .build(),
    );
    let mut w = SerializedFileWriter::new(Vec::new(), schema, props).unwrap();
    for (g, group) in texts.chunks(per_group).enumerate() {
        let mut rg = w.next_row_group().unwrap();
        let mut k = 0;
        while let Some(mut col) = rg.next_column().unwrap() {
            if k == 0 {
                let ids: Vec<i64> = (0..group.len())
                    .map(|i| (g * per_group + i) as i64)
                    .collect();
                col.typed::<Int64Type>()
                    .write_batch(&ids, None, None)
                    .unwrap();
            } else {
                let defs: Vec<i16> = group.iter().map(|t| t.is_some() as i16).collect();
                let vals: Vec<ByteArray> = group
                    .iter()
                    .flatten()
                    .map(|t| ByteArray::from(*t))
                    .collect();
                col.typed::<ByteArrayType>()
                    .write_batch(&vals, Some(&defs), None)
                    .unwrap();
            }
            col.close().unwrap();
            k += 1;
        }
        rg.close().unwrap();
    }
    w.into_inner().unwrap()
}

/// A WET file: a warcinfo record, then one conversion record per document (the last
/// without a final newline), each gzip member on its own as Common Crawl writes them.
fn wet(docs: &[String]) -> Vec<u8> {
    let record = |kind: &str, body: &[u8]| {
        let mut r = format!(
            "WARC/1.0\r\nWARC-Type: {kind}\r\nWARC-Target-URI: http://example.com/\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r.extend_from_slice(b"\r\n\r\n");
        gzip(&r)
    };
    let mut out = record("warcinfo", b"software: test\r\nformat: WARC\r\n");
    for (i, d) in docs.iter().enumerate() {
        let body = if i + 1 == docs.len() {
            d.clone()
        } else {
            format!("{d}\n")
        };
        out.extend(record("conversion", body.as_bytes()));
    }
    out
}

/// Vocabulary and train shards of `inputs` written to `out`: (vocab.txt, shard bytes,
/// manifest).
async fn dataset(
    inputs: &[String],
    out: &str,
    opts: &TextOptions,
) -> crate::Result<(Bytes, Vec<Bytes>, Manifest)> {
    let out = Location::parse(out).unwrap();
    let inputs = expand_inputs(inputs).await?;
    let (vocab, _) = build_vocab(&inputs, &out, opts, 0, 3, false).await?;
    let (m, _) = write_shards(
        &inputs,
        Arc::new(vocab),
        SplitOut {
            out: &out,
            split: "train",
            shard_tokens: 1 << 14,
        },
        opts,
        serde_json::Value::Null,
        3,
        false,
    )
    .await?;
    let mut shards = Vec::new();
    for s in &m.shards {
        shards.push(out.get(&s.name).await.unwrap());
    }
    Ok((out.get("vocab.txt").await.unwrap(), shards, m))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_makes_the_plain_texts_dataset() {
    let docs = documents();
    let text = plain(&docs);
    let (a, b) = docs.split_at(25);
    let (ta, tb) = (plain(a), plain(b));
    let src = Location::parse("memory://formats/src").unwrap();
    let put = |name: &'static str, body: Vec<u8>| {
        let src = src.clone();
        async move { src.put(name, Bytes::from(body)).await.unwrap() }
    };
    put("plain/corpus.txt", text.clone().into_bytes()).await;
    put("split/a.txt", ta.clone().into_bytes()).await;
    put("split/b.txt", tb.clone().into_bytes()).await;
    put("c.txt.gz", gzip_members(text.as_bytes())).await;
    put("c.txt.zst", zstd(text.as_bytes())).await;
    put("c.txt.xz", xz(text.as_bytes())).await;
    put("c.txt.bz2", bzip2(text.as_bytes())).await;
    put("c.jsonl", jsonl(&docs, "text")).await;
    put("c.json.gz", gzip(&jsonl(&docs, "text"))).await;
    put("nested.jsonl.zst", zstd(&jsonl(&docs, "meta.body"))).await;
    let texts: Vec<Option<&str>> = docs.iter().map(|d| Some(d.as_str())).collect();
    put("c.parquet", parquet(&texts, 16)).await;
    put("c.warc.wet.gz", wet(&docs)).await;
    let members = [
        ("corpus/a.txt", ta.as_bytes()),
        ("corpus/b.txt.gz", &gzip(tb.as_bytes())[..]),
    ];
    let archive = tar(&members);
    put("c.tar", archive.clone()).await;
    put("c.tar.gz", gzip(&archive)).await;
    put("c.tar.zst", zstd(&archive)).await;
    put("c.tgz", gzip(&archive)).await;
    put("data.bin", zstd(&jsonl(&docs, "text"))).await;
    let opts = TextOptions::default();
    let url = |n: &str| format!("memory://formats/src/{n}");
    let (vocab, shards, m) = dataset(
        &[url("plain/corpus.txt")],
        "memory://formats/out/plain",
        &opts,
    )
    .await
    .unwrap();
    assert_eq!(m.sources[0].format, "text");
    let nested = TextOptions {
        text_field: "meta.body".into(),
        ..Default::default()
    };
    let forced = TextOptions {
        format: Some("jsonl.zst".into()),
        ..Default::default()
    };
    let cases: Vec<(&str, TextOptions, Vec<&str>)> = vec![
        ("split", opts.clone(), vec!["text", "text"]),
        ("c.txt.gz", opts.clone(), vec!["text.gz"]),
        ("c.txt.zst", opts.clone(), vec!["text.zst"]),
        ("c.txt.xz", opts.clone(), vec!["text.xz"]),
        ("c.txt.bz2", opts.clone(), vec!["text.bz2"]),
        ("c.jsonl", opts.clone(), vec!["jsonl"]),
        ("c.json.gz", opts.clone(), vec!["jsonl.gz"]),
        ("nested.jsonl.zst", nested, vec!["jsonl.zst"]),
        ("c.parquet", opts.clone(), vec!["parquet"]),
        ("c.warc.wet.gz", opts.clone(), vec!["wet.gz"]),
        ("c.tar", opts.clone(), vec!["tar:text", "tar:text.gz"]),
        (
            "c.tar.gz",
            opts.clone(),
            vec!["tar.gz:text", "tar.gz:text.gz"],
        ),
        (
            "c.tar.zst",
            opts.clone(),
            vec!["tar.zst:text", "tar.zst:text.gz"],
        ),
        ("c.tgz", opts.clone(), vec!["tar.gz:text", "tar.gz:text.gz"]),
        ("data.bin", forced, vec!["jsonl.zst"]),
    ];
    for (name, o, formats) in cases {
        let (v, s, m) = dataset(&[url(name)], &format!("memory://formats/out/{name}"), &o)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(v, vocab, "{name}: vocabulary");
        assert_eq!(s, shards, "{name}: shards");
        let got: Vec<&str> = m.sources.iter().map(|s| s.format.as_str()).collect();
        assert_eq!(got, formats, "{name}");
        assert_eq!(
            m.sources.iter().map(|s| s.lines).sum::<u64>(),
            text.lines().count() as u64,
            "{name}"
        );
        if name.contains("tar") {
            let members: Vec<_> = m
                .sources
                .iter()
                .map(|s| s.member.clone().unwrap())
                .collect();
            assert_eq!(members, ["corpus/a.txt", "corpus/b.txt.gz"]);
        }
    }
}

/// What reading `name` to its end says.
async fn read_all(
    loc: &Location,
    name: &str,
    opts: &TextOptions,
) -> crate::Result<(u64, crate::data::text::Skipped)> {
    let mut r = LineReader::open(loc, name, opts).await?;
    let (mut lines, mut skipped, mut s) = (0, crate::data::text::Skipped::default(), String::new());
    while r.next_source().await? {
        while r.next_line(&mut s).await? {}
        lines += r.lines();
        skipped.add(&r.skipped());
    }
    Ok((lines, skipped))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_and_truncated_inputs_are_errors_naming_the_object() {
    let text = plain(&documents()).repeat(40);
    let loc = Location::parse("memory://formats/broken").unwrap();
    let archive = tar(&[("a.txt", text.as_bytes()), ("b.txt", text.as_bytes())]);
    let docs: Vec<Option<&str>> = text.lines().map(Some).collect();
    let whole: Vec<(&str, Vec<u8>)> = vec![
        ("t.txt.gz", gzip(text.as_bytes())),
        ("t.txt.zst", zstd(text.as_bytes())),
        ("t.txt.xz", xz(text.as_bytes())),
        ("t.txt.bz2", bzip2(text.as_bytes())),
        ("t.tar.gz", gzip(&archive)),
        ("t.tar", archive.clone()),
        ("t.parquet", parquet(&docs, 500)),
        ("t.warc.wet", {
            let mut w = format!(
                "WARC/1.0\r\nWARC-Type: conversion\r\nContent-Length: {}\r\n\r\n",
                text.len()
            )
            .into_bytes();
            w.extend_from_slice(text.as_bytes());
            w
        }),
    ];
    let opts = TextOptions::default();
    for (name, body) in whole {
        // Whole: reads.
        loc.put(name, Bytes::from(body.clone())).await.unwrap();
        let (lines, _) = read_all(&loc, name, &opts)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(lines >= text.lines().count() as u64, "{name}");
        // Cut short, and corrupted in the middle.
        let cut = &body[..body.len() * 2 / 3];
        let mut flipped = body.clone();
        let mid = flipped.len() / 2;
        for b in &mut flipped[mid..mid + 64] {
            *b ^= 0x5a;
        }
        for (how, bad) in [("cut", cut.to_vec()), ("flipped", flipped)] {
            // An uncompressed archive's bytes are its text; a Parquet page's corruption
            // shows only where the file carries page checksums (this writer writes none).
            if (name == "t.tar" || name == "t.parquet") && how == "flipped" {
                continue;
            }
            let bad_name = format!("{how}-{name}");
            loc.put(&bad_name, Bytes::from(bad)).await.unwrap();
            let e = read_all(&loc, &bad_name, &opts)
                .await
                .err()
                .unwrap_or_else(|| panic!("{bad_name} read without an error"))
                .to_string();
            assert!(e.contains(&bad_name), "{bad_name}: {e}");
        }
    }
    // The codecs say where they broke.
    loc.put(
        "cut.gz",
        Bytes::from(gzip(text.as_bytes())[..2000].to_vec()),
    )
    .await
    .unwrap();
    let e = read_all(&loc, "cut.gz", &opts)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("gzip stream is corrupt or cut short") && e.contains("decoded bytes"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_input_commits_no_split() {
    let src = Location::parse("memory://formats/partial/src").unwrap();
    let text = plain(&documents());
    src.put("a.txt.gz", Bytes::from(gzip(text.as_bytes())))
        .await
        .unwrap();
    let gz = gzip(text.as_bytes());
    src.put("b.txt.gz", Bytes::from(gz[..gz.len() / 2].to_vec()))
        .await
        .unwrap();
    let out = Location::parse("memory://formats/partial/out").unwrap();
    let inputs = expand_inputs(&["memory://formats/partial/src/a.txt.gz".into()])
        .await
        .unwrap();
    let (vocab, _) = build_vocab(&inputs, &out, &TextOptions::default(), 0, 2, false)
        .await
        .unwrap();
    let all = expand_inputs(&["memory://formats/partial/src".into()])
        .await
        .unwrap();
    let e = write_shards(
        &all,
        Arc::new(vocab),
        SplitOut {
            out: &out,
            split: "train",
            shard_tokens: 1 << 14,
        },
        &TextOptions::default(),
        serde_json::Value::Null,
        2,
        false,
    )
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("b.txt.gz"), "{e}");
    assert!(out.head("train.manifest.json").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_without_text_are_errors_or_counted_skips() {
    let loc = Location::parse("memory://formats/records").unwrap();
    let body = "{\"text\": \"one two\"}\n\n{\"id\": 3}\n[1, 2]\n{\"text\": null}\n{\"text\": 5}\n{\"text\": \"a\\u0000b\"}\n{\"text\": \"last\\nlines\"}\n";
    loc.put("r.jsonl", Bytes::from(body)).await.unwrap();
    let opts = TextOptions::default();
    let e = read_all(&loc, "r.jsonl", &opts)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("r.jsonl record 3") && e.contains("no field \"text\""),
        "{e}"
    );
    let skip = TextOptions {
        bad_lines: BadLines::Skip,
        ..Default::default()
    };
    let (lines, skipped) = read_all(&loc, "r.jsonl", &skip).await.unwrap();
    // "one two", "last", "lines"; the NUL record is a control-byte line.
    assert_eq!(lines, 3);
    assert_eq!((skipped.no_text, skipped.control_bytes), (4, 1));
    let e = read_all(
        &loc,
        "r.jsonl",
        &TextOptions {
            text_field: "meta.body".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("record 1") && e.contains("no field \"meta\""),
        "{e}"
    );
    // A NUL inside a record's text names the record.
    loc.put(
        "nul.jsonl",
        Bytes::from("{\"text\": \"ok\"}\n{\"text\": \"a\\u0000b\"}\n"),
    )
    .await
    .unwrap();
    let e = read_all(&loc, "nul.jsonl", &opts)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("nul.jsonl record 2") && e.contains("control byte 0x00"),
        "{e}"
    );
    // Parquet: no such column; a null value.
    loc.put(
        "p.parquet",
        Bytes::from(parquet(&[Some("a b"), None, Some("c")], 2)),
    )
    .await
    .unwrap();
    let e = read_all(
        &loc,
        "p.parquet",
        &TextOptions {
            text_field: "body".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("no column \"body\"") && e.contains("id, text"),
        "{e}"
    );
    let e = read_all(&loc, "p.parquet", &opts)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("p.parquet row 2") && e.contains("null"), "{e}");
    let (lines, skipped) = read_all(&loc, "p.parquet", &skip).await.unwrap();
    assert_eq!((lines, skipped.no_text), (2, 1));
    let e = read_all(
        &loc,
        "p.parquet",
        &TextOptions {
            text_field: "id".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("not a string column"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archives_filter_members_and_refuse_what_cannot_stream() {
    let loc = Location::parse("memory://formats/tar").unwrap();
    let archive = tar(&[
        ("README", b"not text we want\n"),
        ("train/news-1", b"a b\n"),
        ("train/news-2", b"c\n"),
        ("heldout/news-1", b"d e f\n"),
    ]);
    loc.put("x.tar.gz", Bytes::from(gzip(&archive)))
        .await
        .unwrap();
    let train = TextOptions {
        members: Some("train/".into()),
        ..Default::default()
    };
    let (lines, _) = read_all(&loc, "x.tar.gz", &train).await.unwrap();
    assert_eq!(lines, 2);
    let none = TextOptions {
        members: Some("valid/".into()),
        ..Default::default()
    };
    let e = read_all(&loc, "x.tar.gz", &none)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no file in the archive") && e.contains("valid/"),
        "{e}"
    );
    // Archives concatenated (`cat a.tar.gz b.tar.gz`): both read, to the end.
    let mut both = gzip(&tar(&[("a.txt", b"one\n")]));
    both.extend(gzip(&tar(&[
        ("b.txt", b"two three\n"),
        ("c.txt", b"four\n"),
    ])));
    loc.put("both.tar.gz", Bytes::from(both)).await.unwrap();
    let (lines, _) = read_all(&loc, "both.tar.gz", &TextOptions::default())
        .await
        .unwrap();
    assert_eq!(lines, 3);
    let nested = tar(&[("inner.parquet", b"PAR1")]);
    loc.put("n.tar", Bytes::from(nested)).await.unwrap();
    let e = read_all(&loc, "n.tar", &TextOptions::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("inner.parquet") && e.contains("cannot be streamed"),
        "{e}"
    );
}

#[test]
fn formats_come_from_names_and_from_the_option() {
    for (name, want) in [
        ("ptb.train.txt", "text"),
        ("news.en-00001-of-00100", "text"),
        ("c4-train.00000-of-01024.json.gz", "jsonl.gz"),
        ("pile/00.jsonl.zst", "jsonl.zst"),
        (
            "1-billion-word-language-modeling-benchmark-r13output.tar.gz",
            "tar.gz",
        ),
        ("CC-MAIN-20240101-00000.warc.wet.gz", "wet.gz"),
        ("part-0.parquet", "parquet"),
        ("enwiki-latest-pages-articles.txt.bz2", "text.bz2"),
        ("x.TXT.XZ", "text.xz"),
        ("a.tgz", "tar.gz"),
    ] {
        assert_eq!(Format::of_name(name).name(), want, "{name}");
        assert_eq!(Format::parse(want).unwrap().name(), want);
    }
    for alias in ["txt", "ndjson.gzip", "json.zstd", "tgz", "pq"] {
        assert!(Format::parse(alias).is_ok(), "{alias}");
    }
    // Unknown parts, parts out of order, WARC (only WET's extracted text is read).
    for bad in [
        "jsonl.rar",
        "gz.text",
        "tar.jsonl",
        "gz.tar",
        "warc",
        "warc.gz",
    ] {
        let e = Format::parse(bad).unwrap_err().to_string();
        assert!(e.contains(bad), "{bad}: {e}");
    }
    assert!(
        Format::parse("parquet.gz")
            .unwrap_err()
            .to_string()
            .contains("Parquet")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_reads_json_lines_and_skips_markers_and_manifests() {
    // A Spark `df.write.json` output: part files, a _SUCCESS marker, dot-files.
    let src = Location::parse("memory://formats/spark").unwrap();
    for (name, body) in [
        ("part-00000.json", "{\"text\": \"a b\"}\n"),
        ("part-00001.json", "{\"text\": \"c\"}\n"),
        ("_SUCCESS", ""),
        (".part-00000.json.crc", "crc"),
        ("train.manifest.json", "{}"),
    ] {
        src.put(name, Bytes::from(body)).await.unwrap();
    }
    let inputs = expand_inputs(&["memory://formats/spark".into()])
        .await
        .unwrap();
    let names: Vec<_> = inputs.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["part-00000.json", "part-00001.json"]);
}
