//! `lightrnn shard`: many text files or objects tokenised in parallel into verified u32
//! shards and a manifest; or one part of them (`--part I/N`), or the parts merged
//! (`--merge`).

use clap::Args;
use tokio::runtime::Handle;

use lightrnn_core::data::corpus::{SplitOut, expand_inputs, write_shards};
use lightrnn_core::data::parts::{Part, merge_shards, shard_part};
use lightrnn_core::data::shards::{Manifest, SHARD_TOKENS};
use lightrnn_core::data::store::Location;
use lightrnn_core::data::vocab::{VOCAB_FILE, Vocab};

use super::TextArgs;
use crate::Result;

#[derive(Args, Debug, Clone)]
pub struct ShardArgs {
    /// Text objects or prefixes, concatenated in the order given (prefixes in name order).
    #[arg(long, required = true)]
    pub input: Vec<String>,
    /// The vocabulary: a vocab.txt object, or a location holding one.
    #[arg(long)]
    pub vocab: String,
    /// Output location: SPLIT-NNNNN.u32 shards, SPLIT.manifest.json and vocab.txt.
    #[arg(long)]
    pub out: String,
    /// Split name (train, valid, test, ...).
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Tokens per shard.
    #[arg(long, default_value_t = SHARD_TOKENS)]
    pub shard_tokens: u64,
    /// Tokenise only part I of N of the inputs (contiguous, balanced by bytes) into
    /// OUT/parts/; `--merge` then writes the split.
    #[arg(long, conflicts_with = "merge")]
    pub part: Option<Part>,
    /// Write the split from its parts in OUT/parts/ (made from these same inputs), the
    /// same bytes one process writes; the parts are deleted after.
    #[arg(long)]
    pub merge: bool,
    #[command(flatten)]
    pub text: TextArgs,
}

/// A vocabulary from a vocab.txt object or a location holding one.
async fn load_vocab(url: &str) -> lightrnn_core::Result<Vocab> {
    let loc = Location::parse(url)?;
    let (loc, name) = match loc.parent() {
        Some(parent) if parent.head(&loc.name()).await?.is_some() => (parent, loc.name()),
        _ => (loc, VOCAB_FILE.to_string()),
    };
    let bytes = loc.get(&name).await?;
    let full = loc.url_of(&name);
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| lightrnn_core::Error::Data(format!("{full}: not UTF-8")))?;
    Vocab::parse(text, &full)
}

pub fn run(a: &ShardArgs, handle: &Handle) -> Result<String> {
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let out = Location::parse(&a.out)?;
    let opts = a.text.options();
    let text_options = serde_json::json!({
        "text": opts,
        "shard_tokens": a.shard_tokens,
    });
    let to = SplitOut {
        out: &out,
        split: &a.split,
        shard_tokens: a.shard_tokens,
    };
    let (m, st) = handle.block_on(async {
        let inputs = expand_inputs(&a.input).await?;
        let vocab = std::sync::Arc::new(load_vocab(&a.vocab).await?);
        let parallel = a.text.parallel();
        match (a.part, a.merge) {
            (Some(part), _) => {
                shard_part(&inputs, part, vocab, to, &opts, text_options, parallel, bar).await
            }
            (None, true) => merge_shards(&inputs, vocab, to, text_options, bar).await,
            (None, false) => {
                write_shards(&inputs, vocab, to, &opts, text_options, parallel, bar).await
            }
        }
    })?;
    let mut j = serde_json::to_value(&st)?;
    let at = match a.part {
        Some(_) => out.join(lightrnn_core::data::parts::PARTS_DIR),
        None => out.clone(),
    };
    j["manifest"] = at.url_of(&Manifest::object_name(&m.split)).into();
    Ok(j.to_string())
}
