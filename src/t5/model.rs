//! The T5 v1.1 / FLAN-T5 encoder-decoder, written once over the backend: weights with Hugging Face's
//! names, the encoder, and a decoder that runs any number of new positions against a KV cache (one
//! position per step when generating, the whole target when teacher-forcing).

use super::config::T5Config;
use super::lora::{LoraPair, LoraSettings};
use crate::backend::{AttnInputs, AttnSpec, Backend, Dropout, LoraRef, Position, Prec, RelBias, Shaped};
use crate::checkpoint::{Checkpoint, DType, HostTensor};
use anyhow::{Context, Result, anyhow, bail, ensure};

/// One Hugging Face linear module inside a projection: where its rows sit in the projection's
/// output, and its LoRA adapter.
pub struct Part<B: Backend> {
    /// The module's Hugging Face path, e.g. `decoder.block.3.layer.0.SelfAttention.v`.
    pub path: String,
    /// First output column of this module in the projection's product.
    pub col: usize,
    pub out: usize,
    /// This module's index among all of the model's modules, in checkpoint order: its dropout
    /// stream and its place among the gradients.
    pub slot: usize,
    pub lora: Option<LoraPair<B>>,
}

/// A bias-free linear projection whose weight stacks the rows of one or more modules (q, k and v;
/// wi_0 and wi_1), so that one matrix product serves them all.
pub struct Proj<B: Backend> {
    /// `[Σ out, in]`
    pub weight: B::Weight,
    /// The weight with the parts' adapters merged in (`T5::merge_lora`), while they stay fixed.
    pub merged: Option<B::Weight>,
    pub inp: usize,
    pub parts: Vec<Part<B>>,
}

/// `layer.0.SelfAttention`: q, k and v in one product.
pub struct SelfAttention<B: Backend> {
    pub qkv: Proj<B>,
    pub o: Proj<B>,
    /// Only block 0 owns the table; every block of the stack reuses it.
    pub relative_attention_bias: Option<B::Weight>,
}

/// `layer.1.EncDecAttention`: k and v (of the encoder output, once per sequence) in one product.
pub struct CrossAttention<B: Backend> {
    pub q: Proj<B>,
    pub kv: Proj<B>,
    pub o: Proj<B>,
}

/// The gated FFN, wi_0 and wi_1 in one product.
pub struct DenseReluDense<B: Backend> {
    pub wi: Proj<B>,
    pub wo: Proj<B>,
}

/// One block: `layer.0` self-attention, in the decoder `layer.1` cross-attention, then the FFN.
pub struct Block<B: Backend> {
    pub self_attention: SelfAttention<B>,
    pub self_attention_norm: B::Weight,
    pub cross_attention: Option<(CrossAttention<B>, B::Weight)>,
    pub ff: DenseReluDense<B>,
    pub ff_norm: B::Weight,
}

pub struct Stack<B: Backend> {
    pub blocks: Vec<Block<B>>,
    pub final_layer_norm: B::Weight,
}

impl<B: Backend> Stack<B> {
    pub(crate) fn bias_table(&self) -> &B::Weight {
        self.blocks[0].self_attention.relative_attention_bias.as_ref().expect("block 0 owns the bias")
    }
}

pub struct T5<B: Backend> {
    pub config: T5Config,
    pub shared: B::Weight,
    pub encoder: Stack<B>,
    pub decoder: Stack<B>,
    /// `None` when the head is tied to `shared`.
    pub lm_head: Option<B::Weight>,
    pub lora: Option<LoraSettings>,
    /// The adapters are merged into copies of their weights (`merge_lora`).
    pub lora_merged: bool,
}

/// Per-call switches of the forward pass.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fwd {
    /// Run the LoRA branches (off gives the frozen reference model).
    pub lora: bool,
    /// Apply the adapters' dropout with masks drawn from this seed (training passes); None is
    /// evaluation mode.
    pub dropout_seed: Option<u64>,
    /// Apply T5's own dropout (`config.dropout_rate`, where transformers' T5 applies it in train
    /// mode) with masks drawn from this seed: training passes of the base model (SFT) only, read by
    /// `forward_train`. None everywhere else: inference, and PPO, whose base model runs in eval
    /// mode as the seed's does.
    pub model_dropout: Option<u64>,
}

impl Fwd {
    /// Evaluation mode, with the adapters on or off.
    pub fn eval(lora: bool) -> Self {
        Self { lora, dropout_seed: None, model_dropout: None }
    }

    /// A training pass of the adapters (PPO): adapters on, their dropout drawn from `seed`, the
    /// base model in eval mode.
    pub fn train(seed: u64) -> Self {
        Self { lora: true, dropout_seed: Some(seed), model_dropout: None }
    }
}

/// The places T5's own dropout acts in a training pass, as transformers' T5 applies it: the
/// embeddings' output, each attention's probabilities, each sublayer's output before its residual
/// add, the gated FFN's hidden before wo, and the final layer norm's output; each stack's. The
/// order gives the streams (`stream`), so it is part of a run's reproducibility: append only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropSite {
    Embedding,
    SelfProbs,
    SelfOut,
    CrossProbs,
    CrossOut,
    FfHidden,
    FfOut,
    FinalNorm,
}

impl DropSite {
    /// The mask stream of this site in layer `layer` of `stack` (0 for the stack-wide sites):
    /// distinct for every site of the model.
    pub fn stream(self, stack: StackKind, layer: usize) -> u64 {
        let stack = match stack {
            StackKind::Encoder => 0u64,
            StackKind::Decoder => 1,
        };
        (stack << 40) | ((layer as u64) << 8) | self as u64
    }
}

/// Decoder state carried across calls: self-attention K/V of every position so far and the
/// cross-attention K/V, computed once from the encoder output (each layer's k | v as its
/// projection stacks them, `[B, L, 2·inner]`).
pub struct DecodeCache<'a, B: Backend> {
    pub self_k: Vec<B::Tensor>,
    pub self_v: Vec<B::Tensor>,
    pub cross_kv: Vec<B::Tensor>,
    pub enc_lengths: &'a B::Ids,
    /// Positions already in the cache, as a device counter (`[1]`) so that a decoding step
    /// recorded once as a GPU graph replays at the current position.
    pub pos: B::Ids,
    pub capacity: usize,
}

/// Which stack a weight belongs to, for names and shapes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum StackKind {
    Encoder,
    Decoder,
}

impl StackKind {
    pub fn prefix(self) -> &'static str {
        match self {
            StackKind::Encoder => "encoder",
            StackKind::Decoder => "decoder",
        }
    }
}

/// Reads modules `paths` (each `[out, inp]`) and stacks their rows into one projection.
fn load_proj<B: Backend>(be: &B, ckpt: &Checkpoint, paths: &[String], out: usize, inp: usize) -> Result<Proj<B>> {
    let parts: Vec<HostTensor<'_>> =
        paths.iter().map(|p| ckpt.get_shaped(&format!("{p}.weight"), &[out, inp])).collect::<Result<_>>()?;
    let weight = if parts.len() == 1 {
        be.upload_weight(&parts[0])?
    } else {
        // Keep the stored bytes when the modules agree on a dtype; otherwise meet in f32.
        let same = parts.iter().all(|t| t.dtype == parts[0].dtype);
        let dtype = if same { parts[0].dtype } else { DType::F32 };
        let bytes: Vec<u8> = if same {
            parts.iter().flat_map(|t| t.bytes.iter().copied()).collect()
        } else {
            bytemuck::cast_slice(&parts.iter().flat_map(|t| t.to_f32()).collect::<Vec<f32>>()).to_vec()
        };
        let name = paths.join("+");
        let shape = [out * parts.len(), inp];
        be.upload_weight(&HostTensor { name: &name, dtype, shape: &shape, bytes: &bytes })?
    };
    Ok(Proj {
        weight,
        merged: None,
        inp,
        parts: paths
            .iter()
            .enumerate()
            .map(|(i, p)| Part { path: p.clone(), col: i * out, out, slot: 0, lora: None })
            .collect(),
    })
}

impl<B: Backend> T5<B> {
    /// Loads `config.json` and the weights of a Hugging Face T5 directory onto `be`.
    pub fn load(be: &B, dir: &std::path::Path) -> Result<Self> {
        let config = T5Config::load(dir)?;
        let ckpt = Checkpoint::open_dir(dir)?;
        Self::from_checkpoint(be, config, &ckpt).with_context(|| format!("loading T5 weights from {}", dir.display()))
    }

    pub fn from_checkpoint(be: &B, config: T5Config, ckpt: &Checkpoint) -> Result<Self> {
        let c = &config;
        let (d, inner, ff, v) = (c.d_model, c.inner_dim(), c.d_ff, c.vocab_size);
        let params: usize = super::init::tensor_specs(c).iter().map(|(_, s, _)| s.iter().product::<usize>()).sum();
        be.reserve(params * 2, "the T5 weights in fp16")?;
        let get =
            |name: &str, shape: &[usize]| -> Result<B::Weight> { be.upload_weight(&ckpt.get_shaped(name, shape)?) };
        let proj = |prefix: &str, names: &[&str], out: usize, inp: usize| -> Result<Proj<B>> {
            let paths: Vec<String> = names.iter().map(|n| format!("{prefix}.{n}")).collect();
            load_proj(be, ckpt, &paths, out, inp)
        };
        let stack = |kind: StackKind, layers: usize| -> Result<Stack<B>> {
            let s = kind.prefix();
            let mut blocks = Vec::with_capacity(layers);
            for i in 0..layers {
                let p = format!("{s}.block.{i}.layer");
                let sa = format!("{p}.0.SelfAttention");
                let self_attention = SelfAttention {
                    qkv: proj(&sa, &["q", "k", "v"], inner, d)?,
                    o: proj(&sa, &["o"], d, inner)?,
                    relative_attention_bias: if i == 0 {
                        Some(get(
                            &format!("{sa}.relative_attention_bias.weight"),
                            &[c.relative_attention_num_buckets, c.num_heads],
                        )?)
                    } else {
                        None
                    },
                };
                let ff_layer = if kind == StackKind::Decoder { 2 } else { 1 };
                let cross_attention = if kind == StackKind::Decoder {
                    let ca = format!("{p}.1.EncDecAttention");
                    Some((
                        CrossAttention {
                            q: proj(&ca, &["q"], inner, d)?,
                            kv: proj(&ca, &["k", "v"], inner, d)?,
                            o: proj(&ca, &["o"], d, inner)?,
                        },
                        get(&format!("{p}.1.layer_norm.weight"), &[d])?,
                    ))
                } else {
                    None
                };
                let dr = format!("{p}.{ff_layer}.DenseReluDense");
                blocks.push(Block {
                    self_attention,
                    self_attention_norm: get(&format!("{p}.0.layer_norm.weight"), &[d])?,
                    cross_attention,
                    ff: DenseReluDense { wi: proj(&dr, &["wi_0", "wi_1"], ff, d)?, wo: proj(&dr, &["wo"], d, ff)? },
                    ff_norm: get(&format!("{p}.{ff_layer}.layer_norm.weight"), &[d])?,
                });
            }
            Ok(Stack { blocks, final_layer_norm: get(&format!("{s}.final_layer_norm.weight"), &[d])? })
        };
        let shared_name = if ckpt.contains("shared.weight") { "shared.weight" } else { "encoder.embed_tokens.weight" };
        let shared = get(shared_name, &[v, d])?;
        // transformers keeps a stored lm_head even when the config says tied, if it differs.
        let lm_head = if ckpt.contains("lm_head.weight") {
            Some(get("lm_head.weight", &[v, d])?)
        } else if c.tie_word_embeddings {
            None
        } else {
            bail!("lm_head.weight is missing from {} and config.json says tie_word_embeddings: false", ckpt.describe());
        };
        let mut model = T5 {
            encoder: stack(StackKind::Encoder, c.num_layers)?,
            decoder: stack(StackKind::Decoder, c.num_decoder_layers)?,
            shared,
            lm_head,
            lora: None,
            lora_merged: false,
            config,
        };
        for (slot, (_, part)) in model.modules_mut().into_iter().enumerate() {
            part.slot = slot;
        }
        Ok(model)
    }

    /// The LoRA branches of a projection's modules, when adapters are on.
    pub(crate) fn loras<'a>(&'a self, p: &'a Proj<B>, f: Fwd) -> Vec<LoraRef<'a, B>> {
        let Some(s) = self.lora.as_ref().filter(|_| f.lora) else { return Vec::new() };
        p.parts
            .iter()
            .filter_map(|part| {
                part.lora.as_ref().map(|l| LoraRef {
                    a: &l.a,
                    b: &l.b,
                    shadow: l.shadow.as_ref().map(|(a, b)| (a, b)),
                    scale: s.scale(),
                    col: part.col,
                    dropout: f.dropout_seed.filter(|_| s.dropout > 0.0).map(|seed| Dropout {
                        p: s.dropout,
                        seed,
                        stream: part.slot as u64,
                    }),
                })
            })
            .collect()
    }

    /// The weight and LoRA branches one product of `p` takes: the merged weight alone while the
    /// adapters are on and merged.
    pub(crate) fn operands<'a>(&'a self, p: &'a Proj<B>, f: Fwd) -> (&'a B::Weight, Vec<LoraRef<'a, B>>) {
        match &p.merged {
            Some(m) if f.lora && f.dropout_seed.is_none() => (m, Vec::new()),
            _ => (&p.weight, self.loras(p, f)),
        }
    }

    fn project(&self, be: &B, x: &B::Tensor, p: &Proj<B>, f: Fwd, out: Prec) -> Result<B::Tensor> {
        let (w, loras) = self.operands(p, f);
        be.linear_to(x, w, &loras, out)
    }

    /// `acc += project(x)`: the output projections add straight into the fp32 residual stream.
    fn project_add(&self, be: &B, x: &B::Tensor, p: &Proj<B>, f: Fwd, acc: &mut B::Tensor) -> Result<()> {
        let (w, loras) = self.operands(p, f);
        be.linear_add(x, w, &loras, acc)
    }

    /// Every projection in checkpoint order.
    pub(crate) fn projections(&self) -> Vec<&Proj<B>> {
        let mut out = Vec::new();
        for stack in [&self.encoder, &self.decoder] {
            for block in &stack.blocks {
                let sa = &block.self_attention;
                out.extend([&sa.qkv, &sa.o]);
                if let Some((ca, _)) = block.cross_attention.as_ref() {
                    out.extend([&ca.q, &ca.kv, &ca.o]);
                }
                out.extend([&block.ff.wi, &block.ff.wo]);
            }
        }
        out
    }

    /// `projections`, mutable.
    pub(crate) fn projections_mut(&mut self) -> Vec<&mut Proj<B>> {
        let mut out = Vec::new();
        for stack in [&mut self.encoder, &mut self.decoder] {
            for block in stack.blocks.iter_mut() {
                let sa = &mut block.self_attention;
                out.extend([&mut sa.qkv, &mut sa.o]);
                if let Some((ca, _)) = block.cross_attention.as_mut() {
                    out.extend([&mut ca.q, &mut ca.kv, &mut ca.o]);
                }
                out.extend([&mut block.ff.wi, &mut block.ff.wo]);
            }
        }
        out
    }

    /// Merges the adapters into copies of their projections' weights, so that generation runs one
    /// product per projection; `refresh_lora` re-merges after the adapters change.
    pub fn merge_lora(&mut self, be: &B) -> Result<()> {
        if self.lora.is_none() {
            return Ok(());
        }
        let merged: Vec<Option<B::Weight>> = self
            .projections()
            .into_iter()
            .map(|p| {
                let loras = self.loras(p, Fwd::eval(true));
                if loras.is_empty() { Ok(None) } else { be.merge_lora(&p.weight, &loras).map(Some) }
            })
            .collect::<Result<_>>()?;
        for (p, m) in self.projections_mut().into_iter().zip(merged) {
            p.merged = m;
        }
        self.lora_merged = true;
        Ok(())
    }

    /// `h += wo(gelu_new(wi_0 x) · wi_1 x)`. wo's output joins the fp32 residual stream directly:
    /// producing it in fp16 is what overflows in T5 v1.1.
    fn feed_forward(&self, be: &B, x: &B::Tensor, ff: &DenseReluDense<B>, f: Fwd, h: &mut B::Tensor) -> Result<()> {
        let gate_up = self.project(be, x, &ff.wi, f, Prec::F32)?;
        let inner = be.gated_gelu(&gate_up, None)?;
        self.project_add(be, &inner, &ff.wo, f, h)
    }

    /// q | k | v of `x` through one fused product, `[B, L, 3·inner]`.
    fn qkv(&self, be: &B, x: &B::Tensor, a: &SelfAttention<B>, f: Fwd) -> Result<B::Tensor> {
        self.project(be, x, &a.qkv, f, Prec::Half)
    }

    pub(crate) fn rel_bias<'a>(&self, table: &'a B::Weight, bidirectional: bool) -> RelBias<'a, B> {
        RelBias {
            table,
            bidirectional,
            num_buckets: self.config.relative_attention_num_buckets,
            max_distance: self.config.relative_attention_max_distance,
        }
    }

    /// `ids [B, L]` right-padded, `lengths [B]` real tokens per row → final encoder states `[B, L, d]`.
    pub fn encode(&self, be: &B, ids: &B::Ids, lengths: &B::Ids, f: Fwd) -> Result<B::Tensor> {
        ensure!(f.model_dropout.is_none(), "T5's own dropout runs in training passes (forward_train) only");
        let c = &self.config;
        let l = ids.shape()[1];
        let mut h = be.embedding(&self.shared, ids)?;
        let table = self.encoder.bias_table();
        for block in &self.encoder.blocks {
            let x = be.rms_norm(&h, &block.self_attention_norm, c.layer_norm_epsilon)?;
            let a = &block.self_attention;
            let qkv = self.qkv(be, &x, a, f)?;
            let spec = AttnSpec {
                heads: c.num_heads,
                d_kv: c.d_kv,
                scale: 1.0,
                kv_len: l,
                key_lengths: Some(lengths),
                causal: false,
                q_offset: Position::At(0),
                bias: Some(self.rel_bias(table, true)),
                dropout: None,
            };
            let ctx = be.attention(AttnInputs::Qkv(&qkv), &spec)?;
            self.project_add(be, &ctx, &a.o, f, &mut h)?;
            let x = be.rms_norm(&h, &block.ff_norm, c.layer_norm_epsilon)?;
            self.feed_forward(be, &x, &block.ff, f, &mut h)?;
        }
        be.rms_norm(&h, &self.encoder.final_layer_norm, c.layer_norm_epsilon)
    }

    /// An empty cache for up to `capacity` decoder positions, with every layer's cross-attention
    /// K/V computed once from `enc [B, L, d]`.
    pub fn start_decoding<'a>(
        &self,
        be: &B,
        enc: &B::Tensor,
        enc_lengths: &'a B::Ids,
        capacity: usize,
        f: Fwd,
    ) -> Result<DecodeCache<'a, B>> {
        let b = enc.shape()[0];
        let inner = self.config.inner_dim();
        let mut cache = DecodeCache {
            self_k: Vec::new(),
            self_v: Vec::new(),
            cross_kv: Vec::new(),
            enc_lengths,
            pos: be.upload_ids(&[0], &[1])?,
            capacity,
        };
        for block in &self.decoder.blocks {
            let (ca, _) = block.cross_attention.as_ref().expect("decoder blocks cross-attend");
            cache.cross_kv.push(self.project(be, enc, &ca.kv, f, Prec::Half)?);
            cache.self_k.push(be.zeros_as(&[b, capacity, inner], Prec::Half)?);
            cache.self_v.push(be.zeros_as(&[b, capacity, inner], Prec::Half)?);
        }
        Ok(cache)
    }

    /// Runs `ids [B, n]` as the next n decoder positions and returns their final states `[B, n, d]`
    /// (after `final_layer_norm`: what the LM head and the value head read). The caller keeps the
    /// total within the cache's capacity; positions come from the cache's counter.
    pub fn decode(&self, be: &B, ids: &B::Ids, cache: &mut DecodeCache<'_, B>, f: Fwd) -> Result<B::Tensor> {
        ensure!(f.model_dropout.is_none(), "T5's own dropout runs in training passes (forward_train) only");
        let c = &self.config;
        let n = ids.shape()[1];
        if n > cache.capacity {
            bail!("decoder cache holds {} positions; {n} requested", cache.capacity);
        }
        let enc_len = cache.cross_kv[0].shape()[1];
        let mut h = be.embedding(&self.shared, ids)?;
        let table = self.decoder.bias_table();
        let inner = c.inner_dim();
        for (i, block) in self.decoder.blocks.iter().enumerate() {
            let x = be.rms_norm(&h, &block.self_attention_norm, c.layer_norm_epsilon)?;
            let a = &block.self_attention;
            let [q, k, v]: [B::Tensor; 3] = be
                .split_last(&self.qkv(be, &x, a, f)?, &[inner, inner, inner])?
                .try_into()
                .map_err(|_| anyhow!("q|k|v splits into three"))?;
            be.write_rows(&mut cache.self_k[i], &k, Position::Counter(&cache.pos))?;
            be.write_rows(&mut cache.self_v[i], &v, Position::Counter(&cache.pos))?;
            let spec = AttnSpec {
                heads: c.num_heads,
                d_kv: c.d_kv,
                scale: 1.0,
                kv_len: cache.capacity,
                key_lengths: None,
                causal: true,
                q_offset: Position::Counter(&cache.pos),
                bias: Some(self.rel_bias(table, false)),
                dropout: None,
            };
            let ctx = be.attention(AttnInputs::Apart { q: &q, k: &cache.self_k[i], v: &cache.self_v[i] }, &spec)?;
            self.project_add(be, &ctx, &a.o, f, &mut h)?;

            let (ca, ca_norm) = block.cross_attention.as_ref().expect("decoder blocks cross-attend");
            let x = be.rms_norm(&h, ca_norm, c.layer_norm_epsilon)?;
            let q = self.project(be, &x, &ca.q, f, Prec::Half)?;
            let spec = AttnSpec {
                heads: c.num_heads,
                d_kv: c.d_kv,
                scale: 1.0,
                kv_len: enc_len,
                key_lengths: Some(cache.enc_lengths),
                causal: false,
                q_offset: Position::At(0),
                bias: None,
                dropout: None,
            };
            let ctx = be.attention(AttnInputs::QAndKv { q: &q, kv: &cache.cross_kv[i] }, &spec)?;
            self.project_add(be, &ctx, &ca.o, f, &mut h)?;

            let x = be.rms_norm(&h, &block.ff_norm, c.layer_norm_epsilon)?;
            self.feed_forward(be, &x, &block.ff, f, &mut h)?;
        }
        be.advance(&mut cache.pos, n as u32)?;
        be.rms_norm(&h, &self.decoder.final_layer_norm, c.layer_norm_epsilon)
    }

    /// Vocabulary logits of decoder states `[.., d] → [.., V]`.
    pub fn lm_logits(&self, be: &B, hidden: &B::Tensor) -> Result<B::Tensor> {
        let head = self.lm_head.as_ref().unwrap_or(&self.shared);
        let mut logits = be.linear(hidden, head, &[])?;
        if let Some(s) = self.config.lm_head_scale() {
            be.scale_assign(&mut logits, s)?;
        }
        Ok(logits)
    }

    /// Teacher-forced logits for whole target sequences: `dec_ids [B, T]` → (`[B, T, V]` logits,
    /// `[B, T, d]` final decoder states).
    pub fn forward(
        &self,
        be: &B,
        ids: &B::Ids,
        lengths: &B::Ids,
        dec_ids: &B::Ids,
        f: Fwd,
    ) -> Result<(B::Tensor, B::Tensor)> {
        let enc = self.encode(be, ids, lengths, f)?;
        let t = dec_ids.shape()[1];
        let mut cache = self.start_decoding(be, &enc, lengths, t, f)?;
        let hidden = self.decode(be, dec_ids, &mut cache, f)?;
        Ok((self.lm_logits(be, &hidden)?, hidden))
    }

    /// Drops the merged copies (`merge_lora`), so the adapters run as separate branches again.
    pub fn unmerge_lora(&mut self) {
        for p in self.projections_mut() {
            p.merged = None;
        }
        self.lora_merged = false;
    }

    /// Every linear module with its input width, in checkpoint order: the slots LoRA adapters
    /// attach to, load into and save from.
    pub fn modules(&self) -> Vec<(usize, &Part<B>)> {
        self.projections().into_iter().flat_map(|p| p.parts.iter().map(move |part| (p.inp, part))).collect()
    }

    /// `modules`, mutable.
    pub fn modules_mut(&mut self) -> Vec<(usize, &mut Part<B>)> {
        let mut out = Vec::new();
        for p in self.projections_mut() {
            let inp = p.inp;
            out.extend(p.parts.iter_mut().map(|part| (inp, part)));
        }
        out
    }
}
