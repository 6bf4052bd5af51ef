//! `lightrnn vocab`: the words of many text files or objects counted in parallel, written
//! as vocab.txt; or one part of them (`--part I/N`), or the parts merged (`--merge`).

use clap::Args;
use tokio::runtime::Handle;

use lightrnn_core::data::corpus::{build_vocab, expand_inputs};
use lightrnn_core::data::parts::{Part, count_part, merge_counts};
use lightrnn_core::data::store::Location;
use lightrnn_core::data::vocab::VOCAB_FILE;

use super::TextArgs;
use crate::Result;

#[derive(Args, Debug, Clone)]
pub struct VocabArgs {
    /// Text objects or prefixes (every object below but *.manifest.json, .* and _*):
    /// paths, file://, s3://, gs://, az:// URLs. Compressed, archived and structured
    /// inputs by their names (see --format). Repeatable.
    #[arg(long, required = true)]
    pub input: Vec<String>,
    /// Output location; vocab.txt is written there.
    #[arg(long)]
    pub out: String,
    /// Words kept, most frequent first (0 = all), plus <unk>.
    #[arg(long, default_value_t = 0)]
    pub size: usize,
    /// Count only part I of N of the inputs (contiguous, balanced by bytes) into
    /// OUT/parts/; `--merge` then writes vocab.txt. For array jobs: --part
    /// $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT.
    #[arg(long, conflicts_with = "merge")]
    pub part: Option<Part>,
    /// Sum the parts' counts in OUT/parts/ (made from these same inputs) into vocab.txt.
    #[arg(long)]
    pub merge: bool,
    #[command(flatten)]
    pub text: TextArgs,
}

pub fn run(a: &VocabArgs, handle: &Handle) -> Result<String> {
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let out = Location::parse(&a.out)?;
    let opts = a.text.options();
    if let Some(part) = a.part {
        let (counted, url) = handle.block_on(async {
            let inputs = expand_inputs(&a.input).await?;
            count_part(&inputs, part, &out, &opts, a.text.parallel(), bar).await
        })?;
        let mut j = serde_json::to_value(&counted)?;
        j["part"] = serde_json::to_value(part)?;
        j["out"] = url.into();
        return Ok(j.to_string());
    }
    let (vocab, counted) = handle.block_on(async {
        let inputs = expand_inputs(&a.input).await?;
        if a.merge {
            return merge_counts(&inputs, &out, &opts, a.size).await;
        }
        build_vocab(&inputs, &out, &opts, a.size, a.text.parallel(), bar).await
    })?;
    let mut j = serde_json::to_value(&counted)?;
    j["vocab_size"] = vocab.len().into();
    j["vocab_sha256"] = vocab.sha256().into();
    j["out"] = out.url_of(VOCAB_FILE).into();
    Ok(j.to_string())
}
