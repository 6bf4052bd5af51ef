//! `lightrnn vocab`: the words of many text files or objects counted in parallel, written
//! as vocab.txt.

use clap::Args;
use tokio::runtime::Handle;

use lightrnn_core::data::corpus::{build_vocab, expand_inputs};
use lightrnn_core::data::store::Location;
use lightrnn_core::data::vocab::VOCAB_FILE;

use super::TextArgs;
use crate::Result;

#[derive(Args, Debug, Clone)]
pub struct VocabArgs {
    /// Text objects or prefixes (every object below; *.json skipped): paths, file://,
    /// memory:// URLs. Repeatable.
    #[arg(long, required = true)]
    pub input: Vec<String>,
    /// Output location; vocab.txt is written there.
    #[arg(long)]
    pub out: String,
    /// Words kept, most frequent first (0 = all), plus <unk>.
    #[arg(long, default_value_t = 0)]
    pub size: usize,
    #[command(flatten)]
    pub text: TextArgs,
}

pub fn run(a: &VocabArgs, handle: &Handle) -> Result<String> {
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let out = Location::parse(&a.out)?;
    let (vocab, counted) = handle.block_on(async {
        let inputs = expand_inputs(&a.input).await?;
        build_vocab(
            &inputs,
            &out,
            &a.text.options(),
            a.size,
            a.text.parallel(),
            bar,
        )
        .await
    })?;
    let mut j = serde_json::to_value(&counted)?;
    j["vocab_size"] = vocab.len().into();
    j["vocab_sha256"] = vocab.sha256().into();
    j["out"] = out.url_of(VOCAB_FILE).into();
    Ok(j.to_string())
}
