//! `detox convert`: a Hugging Face T5 checkpoint (fp32/bf16, single or sharded) → one fp16
//! safetensors file beside its config and tokenizer, tensor by tensor so memory stays at one tensor.

use crate::checkpoint::{Checkpoint, DType, HostTensor};
use crate::t5::T5Config;
use crate::t5::init::tensor_specs;
use anyhow::{Context, Result, anyhow, bail};
use half::f16;
use std::borrow::Cow;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Source model directory (config.json + model.safetensors or a sharded index).
    #[arg(long)]
    pub model: PathBuf,
    /// Destination directory.
    #[arg(long)]
    pub out: PathBuf,
}

/// Files copied unchanged when present.
const SIDE_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "spiece.model",
    "generation_config.json",
];

/// A tensor converted to fp16 only when the writer asks for its bytes.
struct LazyF16<'a> {
    src: HostTensor<'a>,
}

impl safetensors::View for &LazyF16<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F16
    }
    fn shape(&self) -> &[usize] {
        self.src.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self.src.dtype {
            DType::F16 => Cow::Borrowed(self.src.bytes),
            _ => Cow::Owned(bytemuck::cast_slice(&self.src.to_f16()).to_vec()),
        }
    }
    fn data_len(&self) -> usize {
        self.src.numel() * 2
    }
}

pub fn run(a: Args) -> Result<()> {
    let cfg = T5Config::load(&a.model)?;
    let ckpt = Checkpoint::open_dir(&a.model)?;
    if a.out.canonicalize().ok() == a.model.canonicalize().ok() {
        bail!("--out must differ from --model ({}): converting in place would destroy the source", a.out.display());
    }
    // Validate every name and shape before writing anything.
    for (name, shape, _) in tensor_specs(&cfg) {
        // Some exports store the embedding only under the encoder's tied name.
        let name =
            if name == "shared.weight" && !ckpt.contains(&name) { "encoder.embed_tokens.weight".into() } else { name };
        ckpt.get_shaped(&name, &shape)?;
    }
    let mut views = Vec::new();
    for name in ckpt.names() {
        let t = ckpt.get(name)?;
        if t.dtype != DType::F16
            && let Some(bad) = t.to_f32().iter().find(|v| v.is_finite() && !f16::from_f32(**v).is_finite())
        {
            bail!("tensor {name} holds {bad}, outside fp16's range: it cannot be stored as fp16");
        }
        views.push((name.to_string(), LazyF16 { src: t }));
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let dest = a.out.join("model.safetensors");
    let tmp = tempfile::NamedTempFile::new_in(&a.out)?;
    let meta = Some([("format".to_string(), "pt".to_string())].into());
    safetensors::serialize_to_file(views.iter().map(|(n, v)| (n.as_str(), v)), meta, tmp.path())
        .map_err(|e| anyhow!("writing {}: {e:?}", dest.display()))?;
    tmp.persist(&dest).with_context(|| format!("renaming into {}", dest.display()))?;
    for f in SIDE_FILES {
        let src = a.model.join(f);
        if src.is_file() {
            crate::fsutil::copy_file(&src, &a.out.join(f))?;
        }
    }
    eprintln!("wrote {} ({} tensors as fp16)", a.out.display(), views.len());
    Ok(())
}
