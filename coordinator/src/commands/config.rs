//! `lightrnn config`: the effective configuration (TOML), or the presets.

use super::{ConfigArgs, resolve_config};
use crate::Result;

pub fn run(a: &ConfigArgs) -> Result<String> {
    if a.list {
        let presets = lightrnn_core::config::PRESETS;
        let width = presets.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
        let lines: Vec<String> = presets
            .iter()
            .map(|(n, text)| format!("{n:width$}  {}", summary(text)))
            .collect();
        return Ok(lines.join("\n"));
    }
    Ok(resolve_config(a)?.to_toml())
}

/// A preset's one-line description: the first sentence of its header comment, cut
/// after about 110 characters at a word.
fn summary(text: &str) -> String {
    let header: Vec<&str> = text
        .lines()
        .map_while(|l| l.strip_prefix('#'))
        .map(str::trim)
        .collect();
    let joined = header.join(" ");
    let sentence = joined
        .split(". ")
        .next()
        .unwrap_or("")
        .trim_end_matches('.');
    if sentence.chars().count() <= 110 {
        return sentence.to_string();
    }
    let cut: String = sentence.chars().take(110).collect();
    let cut = cut.rsplit_once(' ').map_or(cut.as_str(), |(a, _)| a);
    format!("{}…", cut.trim_end_matches([',', ':', ';']))
}
