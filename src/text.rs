//! From dialogue text to T5 input ids and back: the prompt template, tokenization with the model
//! directory's `tokenizer.json`, truncation that keeps the closing EOS, right padding, and decoding.

use anyhow::{Context, Result, anyhow, bail, ensure};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

pub const DEFAULT_TEMPLATE: &str = "Summarize the following conversation.\n\n{dialogue}\n\nSummary:";
pub const DEFAULT_MAX_SOURCE_LEN: usize = 512;

/// Loads a `tokenizer.json`, naming the file in every error.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if !path.is_file() {
        bail!("tokenizer file {} does not exist", path.display());
    }
    Tokenizer::from_file(path).map_err(|e| anyhow!("cannot load tokenizer {}: {e}", path.display()))
}

/// The tokenizer of a model directory, or an explicit file.
pub fn tokenizer_path(model_dir: &Path, explicit: Option<&Path>) -> PathBuf {
    explicit.map(Path::to_path_buf).unwrap_or_else(|| model_dir.join("tokenizer.json"))
}

/// A right-padded batch of ids.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// `[rows, width]`, row-major.
    pub ids: Vec<u32>,
    pub lengths: Vec<u32>,
    pub rows: usize,
    pub width: usize,
}

/// Pads `seqs` on the right with `pad` to the longest one.
pub fn pad_batch(seqs: &[Vec<u32>], pad: u32) -> Batch {
    let width = seqs.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut ids = vec![pad; seqs.len() * width];
    for (row, s) in seqs.iter().enumerate() {
        ids[row * width..row * width + s.len()].copy_from_slice(s);
    }
    Batch { ids, lengths: seqs.iter().map(|s| s.len() as u32).collect(), rows: seqs.len(), width }
}

pub struct Prompter {
    tokenizer: Tokenizer,
    template: String,
    max_source_len: usize,
    eos: u32,
}

impl Prompter {
    /// `vocab_rows` is the model's embedding size: a tokenizer that can emit ids past it is refused
    /// here rather than failing later on a lookup.
    pub fn new(
        tokenizer_file: &Path,
        template: &str,
        max_source_len: usize,
        eos: u32,
        vocab_rows: usize,
    ) -> Result<Self> {
        ensure!(template.contains("{dialogue}"), "prompt template {template:?} has no {{dialogue}} placeholder");
        ensure!(max_source_len >= 2, "max source length must be at least 2 tokens, got {max_source_len}");
        let tokenizer = load_tokenizer(tokenizer_file)?;
        let size = tokenizer.get_vocab_size(true);
        ensure!(
            size <= vocab_rows,
            "tokenizer {} has {size} tokens but the model's embedding has only {vocab_rows} rows",
            tokenizer_file.display()
        );
        Ok(Self { tokenizer, template: template.to_string(), max_source_len, eos })
    }

    pub fn prompt(&self, dialogue: &str) -> String {
        self.template.replace("{dialogue}", dialogue)
    }

    /// The prompt's ids, ending in EOS, truncated to the max source length with EOS kept last.
    pub fn encode(&self, dialogue: &str) -> Result<Vec<u32>> {
        let enc =
            self.tokenizer.encode(self.prompt(dialogue), true).map_err(|e| anyhow!("tokenizing a prompt: {e}"))?;
        let mut ids = enc.get_ids().to_vec();
        if ids.last() != Some(&self.eos) {
            ids.push(self.eos);
        }
        if ids.len() > self.max_source_len {
            ids.truncate(self.max_source_len - 1);
            ids.push(self.eos);
        }
        Ok(ids)
    }

    /// A text's ids as the tokenizer gives them (its post-processor appends EOS), no template.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.tokenizer.encode(text, true).map_err(|e| anyhow!("tokenizing a text: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// Text of generated ids, special tokens (pad, EOS) left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(|e| anyhow!("decoding ids: {e}"))
    }
}

/// Reads JSON Lines from a file or `-` (stdin); blank lines are skipped, and a bad line is
/// reported with its number.
pub fn read_jsonl(path: &str) -> Result<Vec<serde_json::Value>> {
    let text = if path == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("reading standard input")?;
        s
    } else {
        crate::fsutil::read_text(Path::new(path))?
    };
    let name = if path == "-" { "standard input" } else { path };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{name} line {}: not valid JSON", i + 1)))
        .collect()
}

/// Fetches a string field of a JSONL row, naming the row and the field when it is absent.
pub fn string_field<'a>(row: &'a serde_json::Value, field: &str, index: usize, source: &str) -> Result<&'a str> {
    match row.get(field) {
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(other) => bail!("{source} row {}: field \"{field}\" must be a string, got {other}", index + 1),
        None => bail!("{source} row {}: missing field \"{field}\"", index + 1),
    }
}

/// Writes text to a file (atomically) or to stdout for `-`.
pub fn write_output(path: &str, text: &str) -> Result<()> {
    if path == "-" {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes()).context("writing standard output")?;
        out.flush().context("writing standard output")
    } else {
        crate::fsutil::write_atomic(Path::new(path), text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t5() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/tokenizers/t5/tokenizer.json")
    }

    #[test]
    fn hello_world_matches_the_reference_ids() {
        let p = Prompter::new(&t5(), "{dialogue}", 512, 1, 32128).unwrap();
        assert_eq!(p.encode("Hello world").unwrap(), vec![8774, 296, 1]);
    }

    #[test]
    fn the_default_template_wraps_the_dialogue() {
        let p = Prompter::new(&t5(), DEFAULT_TEMPLATE, 512, 1, 32128).unwrap();
        // ids from the tokenizers library on the same file
        let ids = p.encode("A: hi\nB: yo").unwrap();
        assert_eq!(ids, vec![12198, 1635, 1737, 8, 826, 3634, 5, 71, 10, 7102, 272, 10, 3, 63, 32, 20698, 10, 1]);
        assert_eq!(p.decode(&ids).unwrap(), "Summarize the following conversation. A: hi B: yo Summary:");
    }

    #[test]
    fn truncation_keeps_eos_last() {
        let p = Prompter::new(&t5(), DEFAULT_TEMPLATE, 10, 1, 32128).unwrap();
        let ids = p.encode(&"word ".repeat(100)).unwrap();
        assert_eq!(ids.len(), 10);
        assert_eq!(ids[9], 1);
        assert_eq!(&ids[..3], &[12198, 1635, 1737]);
    }

    #[test]
    fn empty_dialogue_still_makes_a_prompt() {
        let p = Prompter::new(&t5(), DEFAULT_TEMPLATE, 512, 1, 32128).unwrap();
        let ids = p.encode("").unwrap();
        assert!(ids.len() > 5);
        assert_eq!(*ids.last().unwrap(), 1);
    }

    #[test]
    fn oversized_tokenizer_is_refused() {
        let err = Prompter::new(&t5(), DEFAULT_TEMPLATE, 512, 1, 300).err().unwrap().to_string();
        assert!(err.contains("32100 tokens") && err.contains("300 rows"), "{err}");
    }

    #[test]
    fn template_needs_placeholder() {
        let err = Prompter::new(&t5(), "Summarize:", 512, 1, 32128).err().unwrap().to_string();
        assert!(err.contains("{dialogue}"), "{err}");
    }

    #[test]
    fn padding_is_on_the_right() {
        let b = pad_batch(&[vec![5, 6, 1], vec![7, 1]], 0);
        assert_eq!(b.ids, vec![5, 6, 1, 7, 1, 0]);
        assert_eq!(b.lengths, vec![3, 2]);
        assert_eq!((b.rows, b.width), (2, 3));
    }
}
