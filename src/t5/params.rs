//! Every weight of the model as a trainable parameter (full-parameter training): the weights in one
//! fixed order with their Hugging Face names, gradients of the same structure, and the f32 masters
//! read from the checkpoint and written back out as one.

use super::model::{Proj, Stack, T5};
use crate::backend::{Backend, Shaped};
use crate::checkpoint::{Checkpoint, DType, OwnedTensor};
use anyhow::{Context, Result, ensure};
use std::collections::BTreeMap;

/// One weight of the model: the Hugging Face tensors whose rows it stacks, each with its row count.
pub struct Param<'a, B: Backend> {
    pub names: Vec<(String, usize)>,
    pub weight: &'a mut B::Weight,
}

/// `Param` for reading: the same names, the weight behind a shared reference.
pub struct ParamRef<'a, B: Backend> {
    pub names: Vec<(String, usize)>,
    pub weight: &'a B::Weight,
}

/// Writes the walk over every weight once, for shared and for mutable access (the two differ only
/// in `&` against `&mut`, `iter` against `iter_mut` and `as_ref` against `as_mut`), so the order the
/// optimiser, the gradients and the checkpoints share is stated in one place.
macro_rules! param_walk {
    ($walk:ident, $param:ident, [$($m:ident)?], $iter:ident, $opt:ident) => {
        impl<B: Backend> T5<B> {
            /// Every weight, in the order `FullGrads::tensors_mut` and the optimiser use.
            pub fn $walk(&$($m)? self) -> Vec<$param<'_, B>> {
                fn proj<B: Backend>(p: &$($m)? Proj<B>) -> $param<'_, B> {
                    $param {
                        names: p.parts.iter().map(|part| (format!("{}.weight", part.path), part.out)).collect(),
                        weight: &$($m)? p.weight,
                    }
                }
                fn named<B: Backend>(name: String, w: &$($m)? B::Weight) -> $param<'_, B> {
                    let rows = w.shape()[0];
                    $param { names: vec![(name, rows)], weight: w }
                }
                fn stack<'a, B: Backend>(stack: &'a $($m)? Stack<B>, prefix: &str, out: &mut Vec<$param<'a, B>>) {
                    for (i, block) in stack.blocks.$iter().enumerate() {
                        let p = format!("{prefix}.block.{i}.layer");
                        let sa = &$($m)? block.self_attention;
                        out.push(proj(&$($m)? sa.qkv));
                        out.push(proj(&$($m)? sa.o));
                        if let Some(table) = sa.relative_attention_bias.$opt() {
                            out.push(named(format!("{p}.0.SelfAttention.relative_attention_bias.weight"), table));
                        }
                        out.push(named(format!("{p}.0.layer_norm.weight"), &$($m)? block.self_attention_norm));
                        let ff_layer = if let Some((ca, norm)) = block.cross_attention.$opt() {
                            out.extend([proj(&$($m)? ca.q), proj(&$($m)? ca.kv), proj(&$($m)? ca.o)]);
                            out.push(named(format!("{p}.1.layer_norm.weight"), norm));
                            2
                        } else {
                            1
                        };
                        out.push(proj(&$($m)? block.ff.wi));
                        out.push(proj(&$($m)? block.ff.wo));
                        out.push(named(format!("{p}.{ff_layer}.layer_norm.weight"), &$($m)? block.ff_norm));
                    }
                    out.push(named(format!("{prefix}.final_layer_norm.weight"), &$($m)? stack.final_layer_norm));
                }
                let mut out = vec![named("shared.weight".into(), &$($m)? self.shared)];
                if let Some(head) = self.lm_head.$opt() {
                    out.push(named("lm_head.weight".into(), head));
                }
                stack(&$($m)? self.encoder, "encoder", &mut out);
                stack(&$($m)? self.decoder, "decoder", &mut out);
                out
            }
        }
    };
}
param_walk!(params_mut, Param, [mut], iter_mut, as_mut);
param_walk!(params, ParamRef, [], iter, as_ref);

/// The gradients of one block's weights, named as the model's fields.
pub struct BlockGrads<B: Backend> {
    pub qkv: B::Tensor,
    pub o: B::Tensor,
    pub self_attention_norm: B::Tensor,
    /// q, kv, o and the layer norm of the decoder's cross-attention.
    pub cross: Option<[B::Tensor; 4]>,
    pub wi: B::Tensor,
    pub wo: B::Tensor,
    pub ff_norm: B::Tensor,
}

pub struct StackGrads<B: Backend> {
    pub blocks: Vec<BlockGrads<B>>,
    /// The table block 0 owns and every block uses.
    pub relative_attention_bias: B::Tensor,
    pub final_layer_norm: B::Tensor,
}

/// The gradient of every weight of the model, f32, mirroring its structure.
pub struct FullGrads<B: Backend> {
    pub shared: B::Tensor,
    /// `None` when the head is tied to `shared`, whose gradient then takes the head's share.
    pub lm_head: Option<B::Tensor>,
    pub encoder: StackGrads<B>,
    pub decoder: StackGrads<B>,
}

fn zeros_like<B: Backend>(be: &B, w: &impl Shaped) -> Result<B::Tensor> {
    be.zeros(w.shape())
}

fn stack_grads<B: Backend>(be: &B, s: &Stack<B>) -> Result<StackGrads<B>> {
    let blocks = s
        .blocks
        .iter()
        .map(|b| {
            Ok(BlockGrads {
                qkv: zeros_like(be, &b.self_attention.qkv.weight)?,
                o: zeros_like(be, &b.self_attention.o.weight)?,
                self_attention_norm: zeros_like(be, &b.self_attention_norm)?,
                cross: match &b.cross_attention {
                    Some((ca, norm)) => Some([
                        zeros_like(be, &ca.q.weight)?,
                        zeros_like(be, &ca.kv.weight)?,
                        zeros_like(be, &ca.o.weight)?,
                        zeros_like(be, norm)?,
                    ]),
                    None => None,
                },
                wi: zeros_like(be, &b.ff.wi.weight)?,
                wo: zeros_like(be, &b.ff.wo.weight)?,
                ff_norm: zeros_like(be, &b.ff_norm)?,
            })
        })
        .collect::<Result<_>>()?;
    Ok(StackGrads {
        blocks,
        relative_attention_bias: zeros_like(be, s.bias_table())?,
        final_layer_norm: zeros_like(be, &s.final_layer_norm)?,
    })
}

impl<B: Backend> FullGrads<B> {
    pub fn zeros(be: &B, model: &T5<B>) -> Result<Self> {
        Ok(Self {
            shared: zeros_like(be, &model.shared)?,
            lm_head: model.lm_head.as_ref().map(|h| zeros_like(be, h)).transpose()?,
            encoder: stack_grads(be, &model.encoder)?,
            decoder: stack_grads(be, &model.decoder)?,
        })
    }

    /// Every gradient in `T5::params_mut`'s order.
    pub fn tensors_mut(&mut self) -> Vec<&mut B::Tensor> {
        let mut out = vec![&mut self.shared];
        out.extend(self.lm_head.as_mut());
        for s in [&mut self.encoder, &mut self.decoder] {
            let StackGrads { blocks, relative_attention_bias, final_layer_norm } = s;
            let mut table = Some(relative_attention_bias);
            for b in blocks.iter_mut() {
                out.extend([&mut b.qkv, &mut b.o]);
                out.extend(table.take());
                out.push(&mut b.self_attention_norm);
                if let Some(c) = b.cross.as_mut() {
                    out.extend(c.iter_mut());
                }
                out.extend([&mut b.wi, &mut b.wo, &mut b.ff_norm]);
            }
            out.push(final_layer_norm);
        }
        out
    }
}

/// Reads the f32 value of every parameter from the checkpoint the model was loaded from, in
/// `params_mut`'s order (the embedding under either of its stored names).
pub fn read_masters<B: Backend>(be: &B, model: &T5<B>, ckpt: &Checkpoint) -> Result<Vec<B::Tensor>> {
    let mut out = Vec::new();
    for p in model.params() {
        let mut values = Vec::with_capacity(p.weight.numel());
        for (name, _) in &p.names {
            let stored =
                if name == "shared.weight" && !ckpt.contains(name) { "encoder.embed_tokens.weight" } else { name };
            values.extend(ckpt.get(stored)?.to_f32());
        }
        ensure!(
            values.len() == p.weight.numel(),
            "{}: {} values for a weight of {:?}",
            p.names[0].0,
            values.len(),
            p.weight.shape()
        );
        out.push(be.upload(&values, p.weight.shape())?);
    }
    Ok(out)
}

/// Values in `params_mut`'s order (masters or gradients) as Hugging Face tensors, stacked
/// projections split back into their modules, f32.
pub fn named_tensors<B: Backend>(
    be: &B,
    model: &T5<B>,
    masters: &[&B::Tensor],
) -> Result<BTreeMap<String, OwnedTensor>> {
    let params = model.params();
    ensure!(params.len() == masters.len(), "{} masters for {} parameters", masters.len(), params.len());
    let mut out = BTreeMap::new();
    for (p, m) in params.iter().zip(masters) {
        let values = be.download(m).with_context(|| format!("downloading {}", p.names[0].0))?;
        let cols: usize = m.shape()[1..].iter().product();
        let mut row = 0;
        for (name, rows) in &p.names {
            let mut shape = m.shape().to_vec();
            shape[0] = *rows;
            let part = &values[row * cols..(row + rows) * cols];
            out.insert(name.clone(), OwnedTensor::from_f32(part, &shape, DType::F32));
            row += rows;
        }
    }
    Ok(out)
}
