//! Memory-mapped safetensors checkpoints: single files or Hugging Face shard sets, read without copying
//! until a tensor is converted to the dtype a backend wants.

use anyhow::{Context, Result, anyhow, bail};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors, tensor::Metadata};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

// safetensors stores little-endian values; the byte casts (bytemuck) read and write native ones.
#[cfg(target_endian = "big")]
compile_error!("detox reads and writes safetensors bytes in native order and needs a little-endian target");

/// The element types the engine reads from a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    fn from_safetensors(d: Dtype) -> Option<Self> {
        match d {
            Dtype::F32 => Some(DType::F32),
            Dtype::F16 => Some(DType::F16),
            Dtype::BF16 => Some(DType::BF16),
            _ => None,
        }
    }

    pub fn to_safetensors(self) -> Dtype {
        match self {
            DType::F32 => Dtype::F32,
            DType::F16 => Dtype::F16,
            DType::BF16 => Dtype::BF16,
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" | "fp32" | "float32" => Ok(DType::F32),
            "f16" | "fp16" | "float16" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            other => bail!("unknown dtype '{other}' (expected f32, f16 or bf16)"),
        }
    }
}

/// A borrowed tensor in its stored dtype, little-endian, row-major.
#[derive(Clone, Copy, Debug)]
pub struct HostTensor<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl HostTensor<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            DType::F32 => bytemuck::pod_collect_to_vec(self.bytes),
            DType::F16 => bytemuck::pod_collect_to_vec::<u8, f16>(self.bytes).into_iter().map(f16::to_f32).collect(),
            DType::BF16 => bytemuck::pod_collect_to_vec::<u8, bf16>(self.bytes).into_iter().map(bf16::to_f32).collect(),
        }
    }

    pub fn to_f16(&self) -> Vec<f16> {
        match self.dtype {
            DType::F16 => bytemuck::pod_collect_to_vec(self.bytes),
            _ => self.to_f32().into_iter().map(f16::from_f32).collect(),
        }
    }
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    metadata: Metadata,
}

/// One or more safetensors files opened as a single name → tensor map.
pub struct Checkpoint {
    shards: Vec<Shard>,
    index: HashMap<String, usize>,
}

impl Checkpoint {
    /// Opens `dir/model.safetensors`, or the shards listed by `dir/model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("model directory {} does not exist or is not a directory", dir.display());
        }
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.is_file() {
            Self::open_files(&[single])
        } else if index.is_file() {
            let text = std::fs::read_to_string(&index).with_context(|| format!("reading {}", index.display()))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| anyhow!("{} has no \"weight_map\" object", index.display()))?;
            let mut files: Vec<String> = map
                .values()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| anyhow!("{}: weight_map values must be file names", index.display()))
                })
                .collect::<Result<_>>()?;
            files.sort();
            files.dedup();
            let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
            Self::open_files(&paths)
        } else {
            bail!("no weights in {}: expected model.safetensors or model.safetensors.index.json", dir.display())
        }
    }

    pub fn open_file(path: &Path) -> Result<Self> {
        Self::open_files(&[path.to_path_buf()])
    }

    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for path in paths {
            let file = File::open(path).with_context(|| format!("cannot open weights file {}", path.display()))?;
            // SAFETY: the mapping is read-only; a checkpoint rewritten underneath a running
            // process is outside what any loader can defend against.
            let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot memory-map {}", path.display()))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
                anyhow!("{} is not a valid safetensors file (truncated or corrupt): {e:?}", path.display())
            })?;
            let shard_id = shards.len();
            for name in metadata.tensors().keys() {
                if index.insert(name.clone(), shard_id).is_some() {
                    bail!("tensor {name} appears in more than one shard ({})", path.display());
                }
            }
            shards.push(Shard { path: path.clone(), mmap, header_len, metadata });
        }
        Ok(Self { shards, index })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(String::as_str).collect();
        v.sort();
        v
    }

    /// The file that holds `name`, for error messages.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.index.get(name).map(|&i| self.shards[i].path.as_path())
    }

    /// Where the weights came from, for error messages.
    pub fn describe(&self) -> String {
        let names: Vec<String> = self.shards.iter().map(|s| s.path.display().to_string()).collect();
        names.join(", ")
    }

    pub fn get(&self, name: &str) -> Result<HostTensor<'_>> {
        let (name, &shard_id) = self
            .index
            .get_key_value(name)
            .ok_or_else(|| anyhow!("tensor {name} is missing from {}", self.describe()))?;
        let shard = &self.shards[shard_id];
        let info = shard.metadata.info(name).expect("indexed tensor has metadata");
        let dtype = DType::from_safetensors(info.dtype).ok_or_else(|| {
            anyhow!(
                "tensor {name} in {} has unsupported dtype {:?} (expected F32, F16 or BF16)",
                shard.path.display(),
                info.dtype
            )
        })?;
        let start = 8 + shard.header_len + info.data_offsets.0;
        let end = 8 + shard.header_len + info.data_offsets.1;
        Ok(HostTensor { name, dtype, shape: &info.shape, bytes: &shard.mmap[start..end] })
    }

    /// Fetches `name` and checks its shape, naming both shapes when they differ.
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<HostTensor<'_>> {
        let t = self.get(name)?;
        if t.shape != shape {
            bail!(
                "tensor {name} in {} has shape {:?}, expected {:?}",
                self.file_of(name).map(|p| p.display().to_string()).unwrap_or_default(),
                t.shape,
                shape
            );
        }
        Ok(t)
    }
}

/// An owned tensor to be written to a safetensors file.
pub struct OwnedTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl OwnedTensor {
    pub fn from_f32(values: &[f32], shape: &[usize], dtype: DType) -> Self {
        let bytes = match dtype {
            DType::F32 => bytemuck::cast_slice(values).to_vec(),
            DType::F16 => bytemuck::cast_slice(&values.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>()).to_vec(),
            DType::BF16 => {
                bytemuck::cast_slice(&values.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>()).to_vec()
            }
        };
        Self { dtype, shape: shape.to_vec(), bytes }
    }
}

impl safetensors::View for &OwnedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype.to_safetensors()
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes tensors to `path` atomically: a temporary file in the same directory, then a rename, so a
/// crash never leaves a half-written checkpoint under the final name.
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, OwnedTensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), metadata)
        .map_err(|e| anyhow!("serializing {}: {e:?}", path.display()))?;
    crate::fsutil::write_atomic(path, &bytes)
}
