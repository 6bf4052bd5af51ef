//! The vocabulary: words by descending training count (ties in byte order, so the same
//! corpus always gives the same ids), with `<unk>` and `<eos>` always present.
//!
//! Stored as `vocab.txt`, one `word count` per line, id = line number - 1 (the layout of
//! fairseq's `dict.txt`; words never contain whitespace because text is split on it).

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use super::text::{EOS, UNK};
use crate::{Error, Result};

/// Name of the vocabulary object beside a dataset's shards and in checkpoints.
pub const VOCAB_FILE: &str = "vocab.txt";

#[derive(Clone, Debug, PartialEq)]
pub struct Vocab {
    words: Vec<String>,
    counts: Vec<u64>,
    index: HashMap<String, u32>,
    unk: u32,
    eos: u32,
}

impl Vocab {
    /// The `size` most frequent words of `counts` (0 = all of them), plus `<unk>` and
    /// `<eos>`; the counts of dropped words go to `<unk>`.
    pub fn build(counts: HashMap<String, u64>, size: usize) -> Result<Self> {
        if size != 0 && size < 2 {
            return Err(Error::Config(format!(
                "vocab_size {size}: need room for {UNK} and {EOS}"
            )));
        }
        let mut all: Vec<(String, u64)> = counts.into_iter().collect();
        all.sort_by(|a, b| {
            b.1.cmp(&a.1)
                .then_with(|| a.0.as_bytes().cmp(b.0.as_bytes()))
        });
        let has = |w: &str, list: &[(String, u64)]| list.iter().any(|(x, _)| x == w);
        let keep = if size == 0 {
            all.len()
        } else {
            // Make room for any special word that would otherwise fall out.
            let mut k = size.min(all.len());
            loop {
                let missing = [UNK, EOS].iter().filter(|s| !has(s, &all[..k])).count();
                if k + missing <= size || k == 0 {
                    break;
                }
                k -= 1;
            }
            k
        };
        let dropped: u64 = all[keep..]
            .iter()
            .filter(|(w, _)| w != UNK && w != EOS)
            .map(|(_, c)| c)
            .sum();
        let mut tail_specials: Vec<(String, u64)> = all[keep..]
            .iter()
            .filter(|(w, _)| w == UNK || w == EOS)
            .cloned()
            .collect();
        all.truncate(keep);
        all.append(&mut tail_specials);
        for s in [UNK, EOS] {
            if !has(s, &all) {
                all.push((s.to_string(), 0));
            }
        }
        if let Some(u) = all.iter_mut().find(|(w, _)| w == UNK) {
            u.1 += dropped;
        }
        all.sort_by(|a, b| {
            b.1.cmp(&a.1)
                .then_with(|| a.0.as_bytes().cmp(b.0.as_bytes()))
        });
        Self::from_pairs(all)
    }

    fn from_pairs(pairs: Vec<(String, u64)>) -> Result<Self> {
        let mut index = HashMap::with_capacity(pairs.len());
        for (i, (w, _)) in pairs.iter().enumerate() {
            if w.is_empty() || w.chars().any(char::is_whitespace) {
                return Err(Error::Data(format!(
                    "vocabulary entry {} ({w:?}) is empty or contains whitespace",
                    i + 1
                )));
            }
            if index.insert(w.clone(), i as u32).is_some() {
                return Err(Error::Data(format!(
                    "vocabulary lists {w:?} twice (line {})",
                    i + 1
                )));
            }
        }
        if pairs.len() > u32::MAX as usize {
            return Err(Error::Data("vocabulary larger than 2^32 words".into()));
        }
        let need = |w: &str| {
            index
                .get(w)
                .copied()
                .ok_or_else(|| Error::Data(format!("vocabulary has no {w} entry")))
        };
        let (unk, eos) = (need(UNK)?, need(EOS)?);
        let (words, counts) = pairs.into_iter().unzip();
        Ok(Self {
            words,
            counts,
            index,
            unk,
            eos,
        })
    }

    /// Parse `vocab.txt` (errors name `url` and the line).
    pub fn parse(text: &str, url: &str) -> Result<Self> {
        let mut pairs = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let mut it = line.split(' ');
            let (w, c) = match (it.next(), it.next(), it.next()) {
                (Some(w), Some(c), None) => (w, c),
                _ => {
                    return Err(Error::Data(format!(
                        "{url} line {}: expected `word count`",
                        i + 1
                    )));
                }
            };
            let c: u64 = c
                .parse()
                .map_err(|_| Error::Data(format!("{url} line {}: bad count {c:?}", i + 1)))?;
            pairs.push((w.to_string(), c));
        }
        if pairs.is_empty() {
            return Err(Error::Data(format!("{url} is empty")));
        }
        Self::from_pairs(pairs).map_err(|e| Error::Data(format!("{url}: {e}")))
    }

    /// `vocab.txt` contents.
    pub fn to_text(&self) -> String {
        let mut s = String::with_capacity(self.words.len() * 12);
        for (w, c) in self.words.iter().zip(&self.counts) {
            s.push_str(w);
            s.push(' ');
            s.push_str(&c.to_string());
            s.push('\n');
        }
        s
    }

    /// SHA-256 of `vocab.txt`: identifies the vocabulary in shards and checkpoints.
    pub fn sha256(&self) -> String {
        hex(&Sha256::digest(self.to_text().as_bytes()))
    }

    pub fn len(&self) -> usize {
        self.words.len()
    }
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }
    /// Id of `w`, or of `<unk>`.
    pub fn id(&self, w: &str) -> u32 {
        self.index.get(w).copied().unwrap_or(self.unk)
    }
    pub fn get(&self, w: &str) -> Option<u32> {
        self.index.get(w).copied()
    }
    pub fn word(&self, id: u32) -> &str {
        &self.words[id as usize]
    }
    pub fn words(&self) -> &[String] {
        &self.words
    }
    pub fn count(&self, id: u32) -> u64 {
        self.counts[id as usize]
    }
    pub fn unk(&self) -> u32 {
        self.unk
    }
    pub fn eos(&self) -> u32 {
        self.eos
    }
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What a corpus's counts say about its vocabulary, to pick `vocab_size`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TypeTokenCurve {
    /// Distinct words against tokens read (Heaps' law): the expected types after each
    /// fraction of the tokens (1/1024, 1/512, ..., all), the tokens read in random order,
    /// so the curve does not depend on how the inputs were split or ordered.
    pub curve: Vec<CurvePoint>,
    /// The share of tokens that would be `<unk>` with each vocabulary size.
    pub unk_rate: Vec<UnkRate>,
    /// Words seen once.
    pub hapax: u64,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct CurvePoint {
    pub tokens: u64,
    pub types: u64,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct UnkRate {
    pub vocab_size: usize,
    pub unk_rate: f64,
}

/// The type/token curve of word counts (`<eos>` included, as a word).
pub fn type_token_curve(counts: &HashMap<String, u64>) -> TypeTokenCurve {
    let tokens: u64 = counts.values().sum();
    let curve = (0..=10)
        .rev()
        .map(|k| {
            let f = 1.0 / f64::from(1u32 << k);
            // E[types] = sum over words of 1 - (1 - f)^count.
            let ln = (1.0 - f).ln();
            let types: f64 = if k == 0 {
                counts.len() as f64
            } else {
                counts.values().map(|&c| 1.0 - (c as f64 * ln).exp()).sum()
            };
            CurvePoint {
                tokens: (tokens as f64 * f).round() as u64,
                types: types.round() as u64,
            }
        })
        .collect();
    let mut sorted: Vec<u64> = counts.values().copied().collect();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let mut unk_rate = Vec::new();
    let (mut covered, mut at) = (0u64, 0usize);
    for size in [
        1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000,
        2_000_000, 5_000_000,
    ] {
        if size > sorted.len() {
            break;
        }
        covered += sorted[at..size].iter().sum::<u64>();
        at = size;
        unk_rate.push(UnkRate {
            vocab_size: size,
            unk_rate: 1.0 - covered as f64 / tokens.max(1) as f64,
        });
    }
    TypeTokenCurve {
        curve,
        unk_rate,
        hapax: sorted.iter().rev().take_while(|&&c| c == 1).count() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(v: &[(&str, u64)]) -> HashMap<String, u64> {
        v.iter().map(|(w, c)| (w.to_string(), *c)).collect()
    }

    #[test]
    fn orders_by_count_then_bytes_and_adds_specials() {
        let v = Vocab::build(counts(&[("b", 3), ("a", 3), ("<eos>", 5), ("z", 1)]), 0).unwrap();
        assert_eq!(v.words(), &["<eos>", "a", "b", "z", "<unk>"]);
        assert_eq!(v.id("nope"), v.unk());
        let back = Vocab::parse(&v.to_text(), "x").unwrap();
        assert_eq!(back, v);
        assert_eq!(back.sha256(), v.sha256());
    }

    #[test]
    fn truncation_keeps_specials_and_moves_counts_to_unk() {
        let v = Vocab::build(
            counts(&[("a", 10), ("b", 9), ("c", 8), ("d", 1), ("<eos>", 2)]),
            4,
        )
        .unwrap();
        assert_eq!(v.len(), 4);
        assert!(v.get("<eos>").is_some() && v.get("<unk>").is_some());
        assert_eq!(v.words()[0], "a");
        assert!(v.get("b").is_some() && v.get("c").is_none() && v.get("d").is_none());
        assert_eq!(v.count(v.unk()), 9); // c + d
    }

    #[test]
    fn parse_rejects_duplicates_and_missing_specials() {
        assert!(
            Vocab::parse("a 1\na 2\n<unk> 0\n<eos> 0\n", "v")
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        assert!(
            Vocab::parse("a 1\n<eos> 1\n", "v")
                .unwrap_err()
                .to_string()
                .contains("<unk>")
        );
        assert!(
            Vocab::parse("a one\n", "v")
                .unwrap_err()
                .to_string()
                .contains("line 1")
        );
        assert!(Vocab::parse("", "v").is_err());
    }

    #[test]
    fn the_type_token_curve_rises_to_the_types_and_prices_each_vocabulary_size() {
        // Zipf-like counts: word k seen 5000 / k times (words 2501.. once).
        let counts: HashMap<String, u64> =
            (1..=5000u64).map(|k| (format!("w{k}"), 5000 / k)).collect();
        let c = type_token_curve(&counts);
        let tokens: u64 = counts.values().sum();
        assert_eq!(c.curve.len(), 11);
        assert_eq!(
            c.curve.last().unwrap(),
            &CurvePoint {
                tokens,
                types: 5000
            }
        );
        assert!(
            c.curve
                .windows(2)
                .all(|w| w[0].types < w[1].types && w[0].tokens < w[1].tokens)
        );
        // 1/1024 of the tokens sees mostly the frequent words.
        assert!(c.curve[0].types < 200, "{:?}", c.curve[0]);
        assert_eq!(c.unk_rate.len(), 3); // 1k, 2k, 5k
        let top1k: u64 = (1..=1000u64).map(|k| 5000 / k).sum();
        assert!((c.unk_rate[0].unk_rate - (1.0 - top1k as f64 / tokens as f64)).abs() < 1e-12);
        assert_eq!(c.unk_rate[2].unk_rate, 0.0);
        assert_eq!(c.hapax, 2500);
    }
}
