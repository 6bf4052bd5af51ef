//! A training corpus: a vocabulary and the train/valid/test splits as shards.
//!
//! `--data` names either a prepared dataset (`vocab.txt`, `{train,valid,test}.manifest.json`
//! and the shards) or a directory of text files whose names contain `train`, `valid` and
//! `test` (PTB's `ptb.train.txt`, ...; several files of a split are read in name order). Text is tokenised once into the run's cache and reused while the
//! text objects and the text options are unchanged.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::corpus::{Input, SplitOut, count_words, write_shards};
use super::shards::{Manifest, Source, SplitReader};
use super::store::Location;
use super::text::TextOptions;
use super::vocab::VOCAB_FILE;
use super::vocab::Vocab;
use crate::{Error, Result};

pub const SPLITS: [&str; 3] = ["train", "valid", "test"];

/// How text becomes shards.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrepareOptions {
    pub text: TextOptions,
    /// Words kept (0 = every training type).
    pub vocab_size: usize,
    pub shard_tokens: u64,
}

/// An opened dataset.
pub struct Dataset {
    pub loc: Location,
    pub vocab: Arc<Vocab>,
    pub train: Arc<SplitReader>,
    pub valid: Arc<SplitReader>,
    pub test: Arc<SplitReader>,
}

impl Dataset {
    /// Open a prepared dataset.
    pub async fn open(loc: &Location) -> Result<Self> {
        let text = loc.get(VOCAB_FILE).await?;
        let url = loc.url_of(VOCAB_FILE);
        let text =
            std::str::from_utf8(&text).map_err(|_| Error::Data(format!("{url}: not UTF-8")))?;
        let vocab = Arc::new(Vocab::parse(text, &url)?);
        let train = SplitReader::open(loc, "train", &vocab).await?;
        let valid = SplitReader::open(loc, "valid", &vocab).await?;
        let test = SplitReader::open(loc, "test", &vocab).await?;
        Ok(Self {
            loc: loc.clone(),
            vocab,
            train,
            valid,
            test,
        })
    }

    /// Whether `loc` holds a prepared dataset.
    pub async fn is_prepared(loc: &Location) -> Result<bool> {
        Ok(loc.head(VOCAB_FILE).await?.is_some()
            && loc.head(&Manifest::object_name("train")).await?.is_some())
    }

    /// Open `data` if it is prepared; otherwise tokenise its text files into `cache`
    /// (reusing what is there when sources and options match).
    pub async fn open_or_prepare(
        data: &Location,
        cache: &Location,
        opts: &PrepareOptions,
    ) -> Result<Self> {
        match Self::open_or_plan(data, cache, opts).await? {
            Opened::Ready(ds) => Ok(ds),
            Opened::Text(splits) => Self::prepare(&splits, cache, opts).await,
        }
    }

    /// Tokenise `splits` (as [`Self::open_or_plan`] lists them) into `cache` in this
    /// process, and open the result.
    pub async fn prepare(
        splits: &[(String, Vec<Input>)],
        cache: &Location,
        opts: &PrepareOptions,
    ) -> Result<Self> {
        prepare(splits, cache, opts).await?;
        Self::open(cache).await
    }

    /// Open `data` if it is prepared, or its tokenised text in `cache` where sources and
    /// options match; otherwise each split's text inputs, in order, to prepare.
    pub async fn open_or_plan(
        data: &Location,
        cache: &Location,
        opts: &PrepareOptions,
    ) -> Result<Opened> {
        if let Some(p) = data.local_path() {
            let what = if !p.exists() {
                "does not exist"
            } else if !p.is_dir() {
                "is a file; expected a directory of *train*, *valid* and *test* text files or a prepared dataset"
            } else {
                ""
            };
            if !what.is_empty() {
                return Err(Error::Data(format!("{}: {what}", p.display())));
            }
        }
        if Self::is_prepared(data).await? {
            return Ok(Opened::Ready(Self::open(data).await?));
        }
        let sources = find_text(data).await?;
        if cached_matches(cache, &sources, opts).await? {
            tracing::info!(cache = %cache, "reusing tokenised data");
            return Ok(Opened::Ready(Self::open(cache).await?));
        }
        let inputs = |files: &[(String, u64, Option<String>)]| -> Vec<Input> {
            files
                .iter()
                .map(|(name, size, tag)| Input {
                    loc: data.clone(),
                    name: name.clone(),
                    size: *size,
                    e_tag: tag.clone(),
                })
                .collect()
        };
        Ok(Opened::Text(
            sources
                .iter()
                .map(|(split, files)| (split.clone(), inputs(files)))
                .collect(),
        ))
    }
}

/// A dataset opened, or the text it is to be prepared from.
pub enum Opened {
    Ready(Dataset),
    /// Each split's inputs (train, valid, test), in order.
    Text(Vec<(String, Vec<Input>)>),
}

/// Text objects of each split: (name, size, e_tag), name order.
type SplitSources = Vec<(String, Vec<(String, u64, Option<String>)>)>;

async fn find_text(data: &Location) -> Result<SplitSources> {
    let (objects, _) = data.list().await?;
    let mut out = Vec::new();
    for split in SPLITS {
        let files: Vec<_> = objects
            .iter()
            .filter(|(name, _)| name.contains(split) && !name.ends_with(".json"))
            .map(|(name, m)| (name.clone(), m.size, m.e_tag.clone()))
            .collect();
        if files.is_empty() {
            return Err(Error::Data(format!(
                "{data}: no text file whose name contains {split:?} (expected *train*, *valid* and *test* files, \
                 e.g. ptb.train.txt, or a prepared dataset with {VOCAB_FILE})"
            )));
        }
        out.push((split.to_string(), files));
    }
    Ok(out)
}

async fn cached_matches(
    cache: &Location,
    sources: &SplitSources,
    opts: &PrepareOptions,
) -> Result<bool> {
    if !Dataset::is_prepared(cache).await? {
        return Ok(false);
    }
    let want_opts = serde_json::to_value(opts).map_err(|e| Error::Data(e.to_string()))?;
    for (split, files) in sources {
        let m = match Manifest::load(cache, split).await {
            Ok(m) => m,
            Err(_) => return Ok(false),
        };
        // One source per object; an archive has one per member, all of its object.
        let mut objects: Vec<&Source> = m.sources.iter().collect();
        objects.dedup_by(|a, b| a.url == b.url && a.member.is_some() && b.member.is_some());
        let same = m.text_options == want_opts
            && objects.len() == files.len()
            && objects.iter().zip(files).all(|(s, (name, size, tag))| {
                s.url.ends_with(&format!("/{name}")) && s.bytes == *size && s.e_tag == *tag
            });
        if !same {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Count words, build the vocabulary, write shards and manifests (manifests last), with
/// the inputs of each split read in parallel ([`super::corpus`]).
async fn prepare(
    splits: &[(String, Vec<Input>)],
    out: &Location,
    opts: &PrepareOptions,
) -> Result<()> {
    let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
    // Pass 1: counts over the training text.
    let (counts, _) = count_words(&splits[0].1, &opts.text, parallel, false).await?;
    let vocab = Arc::new(Vocab::build(counts, opts.vocab_size)?);
    // Clear stale manifests first: a half-written cache must not look complete.
    for split in SPLITS {
        out.delete(&Manifest::object_name(split)).await?;
    }
    // Pass 2: ids.
    let text_options = serde_json::to_value(opts).map_err(|e| Error::Data(e.to_string()))?;
    for (split, inputs) in splits {
        let (m, _) = write_shards(
            inputs,
            vocab.clone(),
            SplitOut {
                out,
                split,
                shard_tokens: opts.shard_tokens,
            },
            &opts.text,
            text_options.clone(),
            parallel,
            false,
        )
        .await?;
        tracing::info!(split = %split, tokens = m.tokens, shards = m.shards.len(), "tokenised");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn opts() -> PrepareOptions {
        PrepareOptions {
            text: TextOptions {
                lowercase: false,
                max_line_bytes: 1 << 20,
                ..Default::default()
            },
            vocab_size: 0,
            shard_tokens: 1 << 20,
        }
    }

    #[tokio::test]
    async fn prepares_text_once_and_reuses_it() {
        let data = Location::parse("memory://dataset-tests/text").unwrap();
        data.put("x.train.txt", Bytes::from_static(b"a b c\nb c\n"))
            .await
            .unwrap();
        data.put("x.valid.txt", Bytes::from_static(b"a d\n"))
            .await
            .unwrap();
        data.put("x.test.txt", Bytes::from_static(b"c c\n"))
            .await
            .unwrap();
        let cache = Location::parse("memory://dataset-tests/cache").unwrap();
        let ds = Dataset::open_or_prepare(&data, &cache, &opts())
            .await
            .unwrap();
        assert_eq!(ds.vocab.len(), 5); // b c <eos> a <unk>
        assert_eq!(ds.train.tokens(), 7);
        let v = ds.valid.read(0, 3).await.unwrap();
        assert_eq!(v, vec![ds.vocab.id("a"), ds.vocab.unk(), ds.vocab.eos()]);
        let first = cache
            .head("train-00000.u32")
            .await
            .unwrap()
            .unwrap()
            .last_modified;
        let again = Dataset::open_or_prepare(&data, &cache, &opts())
            .await
            .unwrap();
        assert_eq!(again.vocab.sha256(), ds.vocab.sha256());
        assert_eq!(
            cache
                .head("train-00000.u32")
                .await
                .unwrap()
                .unwrap()
                .last_modified,
            first
        );
        // A prepared dataset opens directly.
        assert_eq!(
            Dataset::open_or_prepare(&cache, &data, &opts())
                .await
                .unwrap()
                .test
                .tokens(),
            3
        );
    }

    /// `--data DIR` of compressed and structured files: prepared as their plain text
    /// would be, and reused on the next start (an archive's members are one object).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn text_dirs_of_any_format_prepare_and_are_reused() {
        use crate::data::formats::tests::{gzip, tar};
        let (plain, data) = (
            Location::parse("memory://dataset-tests/fmt-plain").unwrap(),
            Location::parse("memory://dataset-tests/fmt").unwrap(),
        );
        let (train, valid, test) = ("a b c\nb c\n", "a d\n", "c c\n");
        for (name, body) in [
            ("x.train.txt", train),
            ("x.valid.txt", valid),
            ("x.test.txt", test),
        ] {
            plain.put(name, Bytes::from(body)).await.unwrap();
        }
        let members = tar(&[("one.txt", b"a b c\n"), ("two.txt", b"b c\n")]);
        data.put("x.train.tar.gz", Bytes::from(gzip(&members)))
            .await
            .unwrap();
        data.put("x.valid.jsonl", Bytes::from("{\"text\": \"a d\"}\n"))
            .await
            .unwrap();
        data.put("x.test.txt.gz", Bytes::from(gzip(test.as_bytes())))
            .await
            .unwrap();
        let want = Dataset::open_or_prepare(
            &plain,
            &Location::parse("memory://dataset-tests/fmt-plain-cache").unwrap(),
            &opts(),
        )
        .await
        .unwrap();
        let cache = Location::parse("memory://dataset-tests/fmt-cache").unwrap();
        let ds = Dataset::open_or_prepare(&data, &cache, &opts())
            .await
            .unwrap();
        assert_eq!(ds.vocab.sha256(), want.vocab.sha256());
        for (a, b) in [
            (&ds.train, &want.train),
            (&ds.valid, &want.valid),
            (&ds.test, &want.test),
        ] {
            assert_eq!(
                a.read(0, a.tokens()).await.unwrap(),
                b.read(0, b.tokens()).await.unwrap()
            );
        }
        assert_eq!(ds.train.manifest().sources.len(), 2);
        let first = cache
            .head("train-00000.u32")
            .await
            .unwrap()
            .unwrap()
            .last_modified;
        Dataset::open_or_prepare(&data, &cache, &opts())
            .await
            .unwrap();
        let again = cache
            .head("train-00000.u32")
            .await
            .unwrap()
            .unwrap()
            .last_modified;
        assert_eq!(first, again, "the archive's dataset was prepared again");
    }

    #[tokio::test]
    async fn missing_split_is_a_clear_error() {
        let data = Location::parse("memory://dataset-tests/partial").unwrap();
        data.put("a.train.txt", Bytes::from_static(b"a\n"))
            .await
            .unwrap();
        let cache = Location::parse("memory://dataset-tests/partial-cache").unwrap();
        let e = Dataset::open_or_prepare(&data, &cache, &opts())
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("\"valid\""), "{e}");
    }
}
