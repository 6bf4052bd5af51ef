//! How text is read: the options every reader of text shares (lines, bad lines, the
//! inputs' format).

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// What to do with a line that cannot be used as text.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BadLines {
    /// Stop with an error naming the object and the line.
    #[default]
    Error,
    /// Leave the line out and count it (reported per reason).
    Skip,
}

impl std::str::FromStr for BadLines {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "error" => Ok(Self::Error),
            "skip" => Ok(Self::Skip),
            other => Err(Error::Config(format!(
                "bad_lines {other:?}: expected error or skip"
            ))),
        }
    }
}

/// How text is read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TextOptions {
    pub lowercase: bool,
    /// Longest accepted line in bytes (without its newline).
    pub max_line_bytes: usize,
    #[serde(default)]
    pub bad_lines: BadLines,
    /// Every input's format (`jsonl.zst`, `tar.gz`, ...), instead of each object's name
    /// saying it ([`super::formats`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Where the text is in a JSON line (a dotted path for nested fields) or which
    /// Parquet column holds it.
    #[serde(
        default = "default_text_field",
        skip_serializing_if = "is_default_field"
    )]
    pub text_field: String,
    /// Of a tar archive, only the files whose names start with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<String>,
}

fn default_text_field() -> String {
    "text".into()
}

fn is_default_field(f: &str) -> bool {
    f == "text"
}

impl Default for TextOptions {
    fn default() -> Self {
        Self {
            lowercase: false,
            max_line_bytes: 1 << 20,
            bad_lines: BadLines::Error,
            format: None,
            text_field: default_text_field(),
            members: None,
        }
    }
}
