//! Pre-tokenised corpora: raw little-endian u32 word ids (`numpy.fromfile(f, '<u4')`
//! reads a shard) plus one JSON manifest per split listing every shard's size, token count
//! and SHA-256, and a CRC-32C per block of `block_tokens` tokens so a streaming reader
//! verifies every byte it uses without reading whole shards first.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::store::Location;
use super::vocab::{Vocab, hex};
use crate::{Error, Result};

pub const MANIFEST_FORMAT: &str = "lightrnn.shards";
/// Default tokens per block of the integrity checks (64 KiB of ids).
pub const BLOCK_TOKENS: u64 = 16_384;
/// Default tokens per shard (64 MiB of ids).
pub const SHARD_TOKENS: u64 = 16 << 20;
/// Upper bound accepted for a manifest object (hostile-input guard).
const MAX_MANIFEST_BYTES: u64 = 256 << 20;

/// Where a split's tokens came from (to decide whether cached shards are current).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Source {
    pub url: String,
    /// The file within the archive at `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// How it was read (`text`, `jsonl.zst`, `tar.gz:text`, ...; [`super::formats`]).
    #[serde(default = "text_format")]
    pub format: String,
    /// The object's size (an archive's, for its members).
    pub bytes: u64,
    pub e_tag: Option<String>,
    /// Lines read (each one `<eos>`).
    pub lines: u64,
    /// Lines left out (`bad_lines = "skip"`), by reason.
    #[serde(default)]
    pub skipped: super::text::Skipped,
}

fn text_format() -> String {
    "text".into()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// Object name, relative to the manifest.
    pub name: String,
    pub tokens: u64,
    pub bytes: u64,
    pub sha256: String,
    /// CRC-32C of each block of `block_tokens` tokens (the last may be shorter).
    pub block_crc32c: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub split: String,
    /// Always "uint32-le".
    pub dtype: String,
    pub vocab_size: usize,
    pub vocab_sha256: String,
    pub tokens: u64,
    pub block_tokens: u64,
    pub shards: Vec<ShardInfo>,
    pub sources: Vec<Source>,
    /// How the text was read (lowercase, max_line_bytes), for cache checks.
    pub text_options: serde_json::Value,
}

impl Manifest {
    /// Object name of a split's manifest.
    pub fn object_name(split: &str) -> String {
        format!("{split}.manifest.json")
    }

    pub async fn load(loc: &Location, split: &str) -> Result<Self> {
        let name = Self::object_name(split);
        let url = loc.url_of(&name);
        let meta = loc
            .head(&name)
            .await?
            .ok_or_else(|| Error::NotFound(url.clone()))?;
        if meta.size > MAX_MANIFEST_BYTES {
            return Err(Error::Data(format!(
                "{url}: {} bytes is too large for a manifest",
                meta.size
            )));
        }
        let bytes = loc.get(&name).await?;
        let m: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Data(format!("{url}: not a shard manifest: {e}")))?;
        m.validate(&url)?;
        Ok(m)
    }

    /// Internal consistency: format, counts, sizes, block lists.
    pub fn validate(&self, url: &str) -> Result<()> {
        let bad = |m: String| Err(Error::Data(format!("{url}: {m}")));
        if self.format != MANIFEST_FORMAT || self.version != 1 {
            return bad(format!(
                "format {:?} version {} is not {MANIFEST_FORMAT} 1",
                self.format, self.version
            ));
        }
        if self.dtype != "uint32-le" {
            return bad(format!("dtype {:?} is not uint32-le", self.dtype));
        }
        if self.block_tokens == 0 || self.block_tokens > 1 << 26 {
            return bad(format!("block_tokens {} out of range", self.block_tokens));
        }
        let mut total = 0u64;
        for s in &self.shards {
            if s.name.is_empty() || s.name.contains("..") || s.name.starts_with('/') {
                return bad(format!(
                    "shard name {:?} is not a plain relative name",
                    s.name
                ));
            }
            if s.bytes != s.tokens.saturating_mul(4) {
                return bad(format!(
                    "shard {} lists {} tokens but {} bytes",
                    s.name, s.tokens, s.bytes
                ));
            }
            if s.block_crc32c.len() as u64 != s.tokens.div_ceil(self.block_tokens) {
                return bad(format!(
                    "shard {} lists {} block checksums for {} tokens",
                    s.name,
                    s.block_crc32c.len(),
                    s.tokens
                ));
            }
            total = total
                .checked_add(s.tokens)
                .ok_or_else(|| Error::Data(format!("{url}: token count overflows")))?;
        }
        if total != self.tokens {
            return bad(format!(
                "shards hold {total} tokens, the manifest says {}",
                self.tokens
            ));
        }
        Ok(())
    }

    /// The shards were written with this vocabulary.
    pub fn check_vocab(&self, vocab: &Vocab, url: &str) -> Result<()> {
        if self.vocab_size != vocab.len() || self.vocab_sha256 != vocab.sha256() {
            return Err(Error::Data(format!(
                "{url}: shards were written for a vocabulary of {} words (sha256 {}), not this one of {} words (sha256 {})",
                self.vocab_size,
                &self.vocab_sha256[..self.vocab_sha256.len().min(12)],
                vocab.len(),
                &vocab.sha256()[..12]
            )));
        }
        Ok(())
    }
}

/// Writes a split's shards and, last, its manifest.
pub struct ShardWriter {
    loc: Location,
    split: String,
    shard_tokens: u64,
    block_tokens: u64,
    vocab_size: usize,
    vocab_sha256: String,
    buf: Vec<u32>,
    shards: Vec<ShardInfo>,
    total: u64,
}

impl ShardWriter {
    pub fn new(loc: &Location, split: &str, vocab: &Vocab, shard_tokens: u64) -> Self {
        let shard_tokens = shard_size(shard_tokens);
        Self {
            loc: loc.clone(),
            split: split.to_string(),
            shard_tokens,
            block_tokens: BLOCK_TOKENS,
            vocab_size: vocab.len(),
            vocab_sha256: vocab.sha256(),
            buf: Vec::new(),
            shards: Vec::new(),
            total: 0,
        }
    }

    /// Append ids; full shards are written out.
    pub async fn extend(&mut self, ids: &[u32]) -> Result<()> {
        self.buf.extend_from_slice(ids);
        while self.buf.len() as u64 >= self.shard_tokens {
            let rest = self.buf.split_off(self.shard_tokens as usize);
            let full = std::mem::replace(&mut self.buf, rest);
            self.write_shard(full).await?;
        }
        Ok(())
    }

    async fn write_shard(&mut self, ids: Vec<u32>) -> Result<()> {
        let name = shard_name(&self.split, self.shards.len() as u64);
        let (bytes, info) = shard_object(name.clone(), &ids, self.block_tokens);
        self.loc.put(&name, bytes).await?;
        self.total += info.tokens;
        self.shards.push(info);
        Ok(())
    }

    pub async fn finish(
        mut self,
        sources: Vec<Source>,
        text_options: serde_json::Value,
    ) -> Result<Manifest> {
        if !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            self.write_shard(rest).await?;
        }
        let m = Manifest {
            format: MANIFEST_FORMAT.into(),
            version: 1,
            split: self.split.clone(),
            dtype: "uint32-le".into(),
            vocab_size: self.vocab_size,
            vocab_sha256: self.vocab_sha256.clone(),
            tokens: self.total,
            block_tokens: self.block_tokens,
            shards: self.shards,
            sources,
            text_options,
        };
        m.save(&self.loc).await?;
        Ok(m)
    }
}

/// The object name of shard `index` of `split`.
pub fn shard_name(split: &str, index: u64) -> String {
    format!("{split}-{index:05}.u32")
}

/// Shards of `shard_tokens` tokens as a writer makes them: at least one block, a whole
/// number of blocks.
pub fn shard_size(shard_tokens: u64) -> u64 {
    shard_tokens.max(BLOCK_TOKENS).div_ceil(BLOCK_TOKENS) * BLOCK_TOKENS
}

/// A shard's bytes (little-endian ids) and its manifest entry.
pub fn shard_object(name: String, ids: &[u32], block_tokens: u64) -> (Bytes, ShardInfo) {
    let mut bytes = Vec::with_capacity(ids.len() * 4);
    for id in ids {
        bytes.extend_from_slice(&id.to_le_bytes());
    }
    let block_crc32c = bytes
        .chunks(block_tokens as usize * 4)
        .map(crc32c::crc32c)
        .collect();
    let info = ShardInfo {
        name,
        tokens: ids.len() as u64,
        bytes: bytes.len() as u64,
        sha256: hex(&Sha256::digest(&bytes)),
        block_crc32c,
    };
    (Bytes::from(bytes), info)
}

impl Manifest {
    /// Write the manifest (the split's last object: it commits the split).
    pub async fn save(&self, loc: &Location) -> Result<()> {
        let json =
            serde_json::to_vec_pretty(self).map_err(|e| Error::Data(format!("manifest: {e}")))?;
        loc.put(&Manifest::object_name(&self.split), Bytes::from(json))
            .await
    }
}

pub struct SplitReader {
    loc: Location,
    manifest: Manifest,
    /// Global token offset where each shard starts.
    starts: Vec<u64>,
    vocab_size: u32,
    memory: Option<Vec<u32>>,
}

impl SplitReader {
    /// Open a split and check its manifest, vocabulary and shard sizes.
    pub async fn open(loc: &Location, split: &str, vocab: &Vocab) -> Result<Arc<Self>> {
        let manifest = Manifest::load(loc, split).await?;
        let url = loc.url_of(&Manifest::object_name(split));
        manifest.check_vocab(vocab, &url)?;
        let mut starts = Vec::with_capacity(manifest.shards.len());
        let mut at = 0;
        for s in &manifest.shards {
            let meta = loc
                .head(&s.name)
                .await?
                .ok_or_else(|| Error::NotFound(loc.url_of(&s.name)))?;
            if meta.size != s.bytes {
                return Err(Error::Data(format!(
                    "{}: {} bytes, the manifest lists {}",
                    loc.url_of(&s.name),
                    meta.size,
                    s.bytes
                )));
            }
            starts.push(at);
            at += s.tokens;
        }
        Ok(Arc::new(Self {
            loc: loc.clone(),
            manifest,
            starts,
            vocab_size: vocab.len() as u32,
            memory: None,
        }))
    }

    /// A split whose ids are already in memory (checked against `vocab`).
    pub fn in_memory(split: &str, ids: Vec<u32>, vocab: &Vocab) -> Result<Arc<Self>> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab.len()) {
            return Err(Error::Data(format!(
                "token id {bad} is outside the vocabulary of {}",
                vocab.len()
            )));
        }
        let manifest = Manifest {
            format: MANIFEST_FORMAT.into(),
            version: 1,
            split: split.into(),
            dtype: "uint32-le".into(),
            vocab_size: vocab.len(),
            vocab_sha256: vocab.sha256(),
            tokens: ids.len() as u64,
            block_tokens: BLOCK_TOKENS,
            shards: vec![],
            sources: vec![],
            text_options: serde_json::Value::Null,
        };
        let loc = Location::parse("memory://lightrnn-in-memory")?;
        Ok(Arc::new(Self {
            loc,
            manifest,
            starts: vec![],
            vocab_size: vocab.len() as u32,
            memory: Some(ids),
        }))
    }

    pub fn tokens(&self) -> u64 {
        self.manifest.tokens
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Tokens [from, to) of the split.
    pub async fn read(&self, from: u64, to: u64) -> Result<Vec<u32>> {
        if from > to || to > self.manifest.tokens {
            return Err(Error::Data(format!(
                "read of tokens {from}..{to} outside the {} tokens of split {}",
                self.manifest.tokens, self.manifest.split
            )));
        }
        if let Some(ids) = &self.memory {
            return Ok(ids[from as usize..to as usize].to_vec());
        }
        let mut out = Vec::with_capacity((to - from) as usize);
        let bt = self.manifest.block_tokens;
        let mut at = from;
        while at < to {
            let si = self.starts.partition_point(|&s| s <= at) - 1;
            let shard = &self.manifest.shards[si];
            let local = at - self.starts[si];
            let local_end = (to - self.starts[si]).min(shard.tokens);
            // Whole blocks covering [local, local_end), each verified.
            let (b0, b1) = (local / bt, local_end.div_ceil(bt));
            let (t0, t1) = (b0 * bt, (b1 * bt).min(shard.tokens));
            let bytes = self.loc.get_range(&shard.name, t0 * 4..t1 * 4).await?;
            if bytes.len() as u64 != (t1 - t0) * 4 {
                return Err(Error::Data(format!(
                    "{}: short read",
                    self.loc.url_of(&shard.name)
                )));
            }
            for (k, blk) in bytes.chunks(bt as usize * 4).enumerate() {
                let b = b0 as usize + k;
                if crc32c::crc32c(blk) != shard.block_crc32c[b] {
                    return Err(Error::Data(format!(
                        "{}: block {b} (tokens {}..) fails its CRC-32C check: the shard is corrupt",
                        self.loc.url_of(&shard.name),
                        b as u64 * bt
                    )));
                }
            }
            let skip = ((local - t0) * 4) as usize;
            let take = ((local_end - local) * 4) as usize;
            for (k, c) in bytes[skip..skip + take].chunks_exact(4).enumerate() {
                let id = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                if id >= self.vocab_size {
                    return Err(Error::Data(format!(
                        "{}: token id {id} at position {} is outside the vocabulary of {}",
                        self.loc.url_of(&shard.name),
                        local + k as u64,
                        self.vocab_size
                    )));
                }
                out.push(id);
            }
            at = self.starts[si] + local_end;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vocab(n: usize) -> Vocab {
        let mut c: HashMap<String, u64> = (0..n - 2)
            .map(|i| (format!("w{i}"), 10 + i as u64))
            .collect();
        c.insert("<eos>".into(), 1);
        Vocab::build(c, 0).unwrap()
    }

    #[tokio::test]
    async fn write_then_read_any_range_across_shards() {
        let loc = Location::parse("memory://shard-tests/a").unwrap();
        let v = vocab(50);
        let ids: Vec<u32> = (0..100_000u32).map(|i| (i * 7) % 50).collect();
        let mut w = ShardWriter::new(&loc, "train", &v, 40_000);
        w.extend(&ids[..30_000]).await.unwrap();
        w.extend(&ids[30_000..]).await.unwrap();
        let m = w.finish(vec![], serde_json::json!({})).await.unwrap();
        assert_eq!(m.tokens, 100_000);
        assert!(m.shards.len() >= 2);
        let r = SplitReader::open(&loc, "train", &v).await.unwrap();
        for (a, b) in [
            (0u64, 10u64),
            (16_380, 16_400),
            (49_000, 50_001),
            (99_990, 100_000),
            (5, 5),
            (0, 100_000),
        ] {
            assert_eq!(
                r.read(a, b).await.unwrap(),
                &ids[a as usize..b as usize],
                "{a}..{b}"
            );
        }
        assert!(r.read(10, 100_001).await.is_err());
    }

    #[tokio::test]
    async fn corruption_and_vocab_mismatch_are_caught() {
        let loc = Location::parse("memory://shard-tests/b").unwrap();
        let v = vocab(20);
        let mut w = ShardWriter::new(&loc, "valid", &v, 1 << 20);
        w.extend(&(0..40_000u32).map(|i| i % 20).collect::<Vec<_>>())
            .await
            .unwrap();
        w.finish(vec![], serde_json::json!({})).await.unwrap();
        // Another vocabulary.
        let e = SplitReader::open(&loc, "valid", &vocab(21))
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("vocabulary"), "{e}");
        // Flip one byte in the middle block.
        let mut bytes = loc.get("valid-00000.u32").await.unwrap().to_vec();
        bytes[20_000 * 4] ^= 1;
        loc.put("valid-00000.u32", Bytes::from(bytes))
            .await
            .unwrap();
        let r = SplitReader::open(&loc, "valid", &v).await.unwrap();
        assert!(r.read(0, 100).await.is_ok());
        let e = r.read(19_000, 21_000).await.unwrap_err().to_string();
        assert!(e.contains("CRC-32C"), "{e}");
        // A truncated shard is refused at open.
        loc.put("valid-00000.u32", Bytes::from(vec![0u8; 8]))
            .await
            .unwrap();
        assert!(SplitReader::open(&loc, "valid", &v).await.is_err());
    }
}
