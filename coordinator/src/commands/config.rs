//! `lightrnn config`: the effective configuration (TOML), or the presets.

use super::{ConfigArgs, resolve_config};
use crate::Result;

pub fn run(a: &ConfigArgs) -> Result<String> {
    if a.list {
        let names: Vec<&str> = lightrnn_worker::config::PRESETS
            .iter()
            .map(|(n, _)| *n)
            .collect();
        return Ok(names.join("\n"));
    }
    Ok(resolve_config(a)?.to_toml())
}
