//! Training passes through T5, written once over the backend: a teacher-forced forward that keeps
//! what the backward needs (the tape), and the hand-written backward from the decoder's final
//! states back through every layer of the decoder and the encoder to the LoRA matrices, or, in
//! full-parameter training, to every weight including the embeddings and the position-bias tables.
//! With `Fwd::model_dropout`, T5's own dropout acts where transformers' T5 applies it in train mode
//! (`DropSite`); its masks come from the counter hash, so the backward draws them again instead of
//! keeping them: fused into the attention kernels, the gated-gelu and its backward, and the
//! residual adds.

use super::model::{DenseReluDense, DropSite, Fwd, Proj, SelfAttention, StackKind, T5};
use super::params::{BlockGrads, FullGrads, StackGrads};
use super::trainable::a_then_b;
use crate::backend::{Attended, AttnGrads, AttnInputs, AttnSpec, Backend, Dropout, LoraGrad, Position, Prec, Shaped};
use anyhow::{Result, ensure};

/// One encoder block's saved activations.
pub struct EncoderLayerTape<B: Backend> {
    /// The residual stream entering the block, and after its attention.
    h_in: B::Tensor,
    h_mid: B::Tensor,
    /// The normed inputs of the attention and of the FFN.
    x_attn: B::Tensor,
    x_ff: B::Tensor,
    /// The attention's q | k | v as their one product made them.
    qkv: B::Tensor,
    ctx: Attended<B::Tensor>,
    gate_up: B::Tensor,
    /// The FFN's hidden as wo read it (after its dropout).
    inner: B::Tensor,
}

/// One decoder block's saved activations.
pub struct DecoderLayerTape<B: Backend> {
    h_in: B::Tensor,
    h_self: B::Tensor,
    h_cross: B::Tensor,
    x_self: B::Tensor,
    x_cross: B::Tensor,
    x_ff: B::Tensor,
    qkv: B::Tensor,
    ctx: Attended<B::Tensor>,
    /// The cross-attention's q, and its k | v from the encoder's output.
    q_cross: B::Tensor,
    kv_cross: B::Tensor,
    ctx_cross: Attended<B::Tensor>,
    gate_up: B::Tensor,
    inner: B::Tensor,
}

/// Everything `backward` reads, from one `forward_train`.
pub struct Tape<B: Backend> {
    encoder: Vec<EncoderLayerTape<B>>,
    /// The encoder's residual stream before its final norm, and its output (after its dropout).
    enc_last: B::Tensor,
    enc_out: B::Tensor,
    decoder: Vec<DecoderLayerTape<B>>,
    dec_last: B::Tensor,
    f: Fwd,
}

/// Gradients of every adapted module's A and B, indexed by `Part::slot`.
pub struct LoraGrads<B: Backend> {
    pub slots: Vec<Option<(B::Tensor, B::Tensor)>>,
}

impl<B: Backend> LoraGrads<B> {
    /// Zeroed gradients for every module that carries an adapter.
    pub fn zeros(be: &B, model: &T5<B>) -> Result<Self> {
        let slots = model
            .modules()
            .into_iter()
            .map(|(_, part)| {
                part.lora.as_ref().map(|l| Ok((be.zeros(l.a.shape())?, be.zeros(l.b.shape())?))).transpose()
            })
            .collect::<Result<_>>()?;
        Ok(Self { slots })
    }

    /// The gradients in `T5::lora_trainables`' order (`a_then_b`).
    pub fn tensors(&self) -> impl Iterator<Item = &B::Tensor> {
        a_then_b(self.slots.iter().flatten().map(|(a, b)| (a, b)))
    }

    /// `tensors`, mutable.
    pub fn tensors_mut(&mut self) -> impl Iterator<Item = &mut B::Tensor> {
        a_then_b(self.slots.iter_mut().flatten().map(|(a, b)| (a, b)))
    }
}

/// `x` through dropout `d`, or `x` itself without one.
fn dropped<B: Backend>(be: &B, x: B::Tensor, d: Option<Dropout>) -> Result<B::Tensor> {
    match d {
        Some(d) => be.dropout(&x, &d),
        None => Ok(x),
    }
}

impl<B: Backend> T5<B> {
    /// T5's own dropout at `site` of layer `layer` of `stack` in a pass under `f` (`layer` 0 for
    /// the stack-wide sites): None unless `f.model_dropout` is set and `dropout_rate` is positive.
    pub fn model_drop(&self, f: Fwd, stack: StackKind, layer: usize, site: DropSite) -> Option<Dropout> {
        let p = self.config.dropout_rate;
        f.model_dropout.filter(|_| p > 0.0).map(|seed| Dropout { p, seed, stream: site.stream(stack, layer) })
    }

    fn attn_spec<'a>(
        &'a self,
        lengths: Option<&'a B::Ids>,
        keys: usize,
        causal: bool,
        bias: Option<bool>,
        dropout: Option<Dropout>,
    ) -> AttnSpec<'a, B> {
        let c = &self.config;
        let table = |bidirectional: bool| {
            let stack = if bidirectional { &self.encoder } else { &self.decoder };
            self.rel_bias(stack.bias_table(), bidirectional)
        };
        AttnSpec {
            heads: c.num_heads,
            d_kv: c.d_kv,
            scale: 1.0,
            kv_len: keys,
            key_lengths: lengths,
            causal,
            q_offset: Position::At(0),
            bias: bias.map(table),
            dropout,
        }
    }

    fn project_train(&self, be: &B, x: &B::Tensor, p: &Proj<B>, f: Fwd, out: Prec) -> Result<B::Tensor> {
        be.linear_to(x, &p.weight, &self.loras(p, f), out)
    }

    /// The teacher-forced pass of `dec_ids [B, T]` against prompts `ids [B, L]`, keeping the tape:
    /// returns the decoder's final states `[B, T, d]`. Adapters run unmerged, with dropout when
    /// `f.dropout_seed` is set; T5's own dropout acts when `f.model_dropout` is.
    pub fn forward_train(
        &self,
        be: &B,
        ids: &B::Ids,
        lengths: &B::Ids,
        dec_ids: &B::Ids,
        f: Fwd,
    ) -> Result<(B::Tensor, Tape<B>)> {
        use DropSite::*;
        use StackKind::{Decoder, Encoder};
        let c = &self.config;
        let eps = c.layer_norm_epsilon;
        let l = ids.shape()[1];
        let t = dec_ids.shape()[1];
        let drop = |stack, layer, site| self.model_drop(f, stack, layer, site);

        let mut h = dropped(be, be.embedding(&self.shared, ids)?, drop(Encoder, 0, Embedding))?;
        let mut encoder = Vec::with_capacity(self.encoder.blocks.len());
        for (i, block) in self.encoder.blocks.iter().enumerate() {
            let a: &SelfAttention<B> = &block.self_attention;
            let x_attn = be.rms_norm(&h, &block.self_attention_norm, eps)?;
            let qkv = self.project_train(be, &x_attn, &a.qkv, f, Prec::Half)?;
            let spec = self.attn_spec(Some(lengths), l, false, Some(true), drop(Encoder, i, SelfProbs));
            let ctx = be.attention_train(AttnInputs::Qkv(&qkv), &spec)?;
            let h_in = self.residual(be, &mut h, &ctx.out, &a.o, f, drop(Encoder, i, SelfOut))?;
            let x_ff = be.rms_norm(&h, &block.ff_norm, eps)?;
            let gate_up = self.project_train(be, &x_ff, &block.ff.wi, f, Prec::F32)?;
            let ff_inner = be.gated_gelu(&gate_up, drop(Encoder, i, FfHidden))?;
            let h_mid = self.residual(be, &mut h, &ff_inner, &block.ff.wo, f, drop(Encoder, i, FfOut))?;
            encoder.push(EncoderLayerTape { h_in, h_mid, x_attn, x_ff, qkv, ctx, gate_up, inner: ff_inner });
        }
        let enc_out = be.rms_norm(&h, &self.encoder.final_layer_norm, eps)?;
        let enc_out = dropped(be, enc_out, drop(Encoder, 0, FinalNorm))?;
        let enc_last = h;

        let mut h = dropped(be, be.embedding(&self.shared, dec_ids)?, drop(Decoder, 0, Embedding))?;
        let mut decoder = Vec::with_capacity(self.decoder.blocks.len());
        for (i, block) in self.decoder.blocks.iter().enumerate() {
            let a = &block.self_attention;
            let x_self = be.rms_norm(&h, &block.self_attention_norm, eps)?;
            let qkv = self.project_train(be, &x_self, &a.qkv, f, Prec::Half)?;
            let spec = self.attn_spec(None, t, true, Some(false), drop(Decoder, i, SelfProbs));
            let ctx = be.attention_train(AttnInputs::Qkv(&qkv), &spec)?;
            let h_in = self.residual(be, &mut h, &ctx.out, &a.o, f, drop(Decoder, i, SelfOut))?;
            let (ca, ca_norm) = block.cross_attention.as_ref().expect("decoder blocks cross-attend");
            let x_cross = be.rms_norm(&h, ca_norm, eps)?;
            let q_cross = self.project_train(be, &x_cross, &ca.q, f, Prec::Half)?;
            let kv_cross = self.project_train(be, &enc_out, &ca.kv, f, Prec::Half)?;
            let spec = self.attn_spec(Some(lengths), l, false, None, drop(Decoder, i, CrossProbs));
            let ctx_cross = be.attention_train(AttnInputs::QAndKv { q: &q_cross, kv: &kv_cross }, &spec)?;
            let h_self = self.residual(be, &mut h, &ctx_cross.out, &ca.o, f, drop(Decoder, i, CrossOut))?;
            let x_ff = be.rms_norm(&h, &block.ff_norm, eps)?;
            let gate_up = self.project_train(be, &x_ff, &block.ff.wi, f, Prec::F32)?;
            let ff_inner = be.gated_gelu(&gate_up, drop(Decoder, i, FfHidden))?;
            let h_cross = self.residual(be, &mut h, &ff_inner, &block.ff.wo, f, drop(Decoder, i, FfOut))?;
            decoder.push(DecoderLayerTape {
                h_in,
                h_self,
                h_cross,
                x_self,
                x_cross,
                x_ff,
                qkv,
                ctx,
                q_cross,
                kv_cross,
                ctx_cross,
                gate_up,
                inner: ff_inner,
            });
        }
        let hidden = be.rms_norm(&h, &self.decoder.final_layer_norm, eps)?;
        let hidden = dropped(be, hidden, drop(Decoder, 0, FinalNorm))?;
        Ok((hidden, Tape { encoder, enc_last, enc_out, decoder, dec_last: h, f }))
    }

    /// `h ← h + dropout(p(x))` in a new tensor, returning the old residual (the input of the
    /// sublayer's norm, which the backward reads). Without dropout the product adds straight into
    /// the copy; with it, the product lands in f32 and joins through `dropout_add`.
    fn residual(
        &self,
        be: &B,
        h: &mut B::Tensor,
        x: &B::Tensor,
        p: &Proj<B>,
        f: Fwd,
        d: Option<Dropout>,
    ) -> Result<B::Tensor> {
        let mut next = be.zeros(h.shape())?;
        be.copy_into(&mut next, 0, h)?;
        match d {
            None => be.linear_add(x, &p.weight, &self.loras(p, f), &mut next)?,
            Some(d) => be.dropout_add(&mut next, &self.project_train(be, x, p, f, Prec::F32)?, &d)?,
        }
        Ok(std::mem::replace(h, next))
    }
}

/// The backward's shared state: the backend, the model, the training pass's switches, and where
/// the adapters' gradients accumulate.
struct Backprop<'a, B: Backend> {
    be: &'a B,
    model: &'a T5<B>,
    f: Fwd,
    grads: &'a mut LoraGrads<B>,
}

impl<B: Backend> Backprop<'_, B> {
    /// `linear_backward` of projection `p`, its LoRA gradients taken out of `grads` for the call,
    /// and its weight's gradient into `dw` in full-parameter training.
    fn proj(
        &mut self,
        p: &Proj<B>,
        x: &B::Tensor,
        dy: &B::Tensor,
        dx: Option<&mut B::Tensor>,
        dw: Option<&mut B::Tensor>,
    ) -> Result<()> {
        let loras = self.model.loras(p, self.f);
        let slots: Vec<usize> =
            p.parts.iter().filter(|part| part.lora.is_some() && self.f.lora).map(|part| part.slot).collect();
        let mut taken: Vec<(B::Tensor, B::Tensor)> =
            slots.iter().map(|&s| self.grads.slots[s].take().expect("a gradient for every adapted module")).collect();
        let result = {
            let mut refs: Vec<LoraGrad<'_, B>> = taken.iter_mut().map(|(a, b)| LoraGrad { a, b }).collect();
            self.be.linear_backward(x, &p.weight, &loras, dy, dx, dw, &mut refs)
        };
        for (s, g) in slots.into_iter().zip(taken) {
            self.grads.slots[s] = Some(g);
        }
        result
    }

    /// `dx += ∂ rms_norm(x) / ∂x · dy`, and the scale's gradient into `dw`.
    fn norm(
        &self,
        x: &B::Tensor,
        w: &B::Weight,
        dy: &B::Tensor,
        dx: &mut B::Tensor,
        dw: Option<&mut B::Tensor>,
    ) -> Result<()> {
        let eps = self.model.config.layer_norm_epsilon;
        if let Some(dw) = dw {
            self.be.rms_norm_weight_grad(x, eps, dy, dw)?;
        }
        self.be.rms_norm_backward(x, w, eps, dy, dx)
    }

    /// Attention's input gradients, and its bias table's into `d_table`.
    fn attention(
        &self,
        x: AttnInputs<'_, B::Tensor>,
        fwd: &Attended<B::Tensor>,
        d_ctx: &B::Tensor,
        spec: &AttnSpec<'_, B>,
        d_table: Option<&mut B::Tensor>,
    ) -> Result<AttnGrads<B::Tensor>> {
        self.be.attention_backward(x, fwd, d_ctx, spec, d_table)
    }

    /// T5's own dropout at a site of the training pass being differentiated.
    fn site(&self, stack: StackKind, layer: usize, site: DropSite) -> Option<Dropout> {
        self.model.model_drop(self.f, stack, layer, site)
    }

    /// The gradient before a dropout site from the one after it (dropout is its own backward);
    /// None without dropout, where the gradient passes unchanged.
    fn through(&self, dy: &B::Tensor, d: Option<Dropout>) -> Result<Option<B::Tensor>> {
        d.map(|d| self.be.dropout(dy, &d)).transpose()
    }

    /// Through `dropout_out(wo(dropout_hidden(gelu_new(wi_0 x) · wi_1 x)))`: the gradient at the
    /// FFN's normed input. `dw` takes the gradients of wi and wo.
    fn ffn(
        &mut self,
        ff: &DenseReluDense<B>,
        (gate_up, inner): (&B::Tensor, &B::Tensor),
        x: &B::Tensor,
        dh: &B::Tensor,
        (out, hidden): (Option<Dropout>, Option<Dropout>),
        dw: Option<(&mut B::Tensor, &mut B::Tensor)>,
    ) -> Result<B::Tensor> {
        let (d_wi, d_wo) = dw.unzip();
        let dy = self.through(dh, out)?;
        let mut d_inner = self.be.zeros(inner.shape())?;
        self.proj(&ff.wo, inner, dy.as_ref().unwrap_or(dh), Some(&mut d_inner), d_wo)?;
        let d_gate_up = self.be.gated_gelu_backward(gate_up, &d_inner, hidden)?;
        let mut d_x = self.be.zeros(x.shape())?;
        self.proj(&ff.wi, x, &d_gate_up, Some(&mut d_x), d_wi)?;
        Ok(d_x)
    }
}

/// The weight gradients of one stack, split so that a block's and the shared table's can be
/// borrowed together.
struct StackSink<'a, B: Backend> {
    blocks: Option<&'a mut [BlockGrads<B>]>,
    table: Option<&'a mut B::Tensor>,
    final_norm: Option<&'a mut B::Tensor>,
}

impl<'a, B: Backend> StackSink<'a, B> {
    fn new(g: Option<&'a mut StackGrads<B>>) -> Self {
        match g {
            Some(g) => Self {
                blocks: Some(&mut g.blocks),
                table: Some(&mut g.relative_attention_bias),
                final_norm: Some(&mut g.final_layer_norm),
            },
            None => Self { blocks: None, table: None, final_norm: None },
        }
    }

    fn block(&mut self, i: usize) -> Option<&mut BlockGrads<B>> {
        self.blocks.as_deref_mut().map(|b| &mut b[i])
    }
}

impl<B: Backend> T5<B> {
    /// Backpropagates `d_hidden` (the gradient at the decoder's final states) through the tape
    /// into the adapters' `grads`, accumulating.
    pub fn backward(
        &self,
        be: &B,
        tape: &Tape<B>,
        lengths: &B::Ids,
        d_hidden: &B::Tensor,
        grads: &mut LoraGrads<B>,
    ) -> Result<()> {
        self.backprop(be, tape, lengths, d_hidden, grads, None).map(|_| ())
    }

    /// Full-parameter training: backpropagates `d_hidden` into the gradient of every weight but
    /// the LM head's (`lm_logits_backward`), accumulating. The model carries no adapters.
    pub fn backward_full(
        &self,
        be: &B,
        tape: &Tape<B>,
        (ids, lengths, dec_ids): (&B::Ids, &B::Ids, &B::Ids),
        d_hidden: &B::Tensor,
        grads: &mut FullGrads<B>,
    ) -> Result<()> {
        ensure!(self.lora.is_none(), "full-parameter training runs without LoRA adapters");
        let mut no_adapters = LoraGrads { slots: Vec::new() };
        let (d_dec, d_enc) = self.backprop(be, tape, lengths, d_hidden, &mut no_adapters, Some(grads))?;
        // Through the embeddings' dropout to the table.
        let embedded = |d: B::Tensor, stack| dropped(be, d, self.model_drop(tape.f, stack, 0, DropSite::Embedding));
        be.embedding_backward(dec_ids, &embedded(d_dec, StackKind::Decoder)?, &mut grads.shared)?;
        be.embedding_backward(ids, &embedded(d_enc, StackKind::Encoder)?, &mut grads.shared)
    }

    /// Logits `= s · hidden · headᵀ` backwards: returns the gradient at `hidden`, and adds the
    /// head's (or, tied, the shared embedding's) gradient to `grads` when given.
    pub fn lm_logits_backward(
        &self,
        be: &B,
        hidden: &B::Tensor,
        d_logits: &B::Tensor,
        grads: Option<&mut FullGrads<B>>,
    ) -> Result<B::Tensor> {
        let head = self.lm_head.as_ref().unwrap_or(&self.shared);
        let scaled;
        let dy = match self.config.lm_head_scale() {
            Some(s) => {
                let mut t = be.zeros(d_logits.shape())?;
                be.copy_into(&mut t, 0, d_logits)?;
                be.scale_assign(&mut t, s)?;
                scaled = t;
                &scaled
            }
            None => d_logits,
        };
        let dw = grads.map(|g| match g.lm_head.as_mut() {
            Some(h) => h,
            None => &mut g.shared,
        });
        let mut d_hidden = be.zeros(hidden.shape())?;
        be.linear_backward(hidden, head, &[], dy, Some(&mut d_hidden), dw, &mut [])?;
        Ok(d_hidden)
    }

    /// The backward through both stacks; returns the gradients at the start of the decoder's and
    /// the encoder's residual streams (after the embeddings' dropout).
    fn backprop(
        &self,
        be: &B,
        tape: &Tape<B>,
        lengths: &B::Ids,
        d_hidden: &B::Tensor,
        grads: &mut LoraGrads<B>,
        full: Option<&mut FullGrads<B>>,
    ) -> Result<(B::Tensor, B::Tensor)> {
        use DropSite::*;
        use StackKind::{Decoder, Encoder};
        let l = tape.enc_out.shape()[1];
        let t = d_hidden.shape()[1];
        ensure!(tape.decoder.len() == self.decoder.blocks.len(), "the tape does not belong to this model");
        let (enc_g, dec_g) = match full {
            Some(g) => (Some(&mut g.encoder), Some(&mut g.decoder)),
            None => (None, None),
        };
        let (mut enc_g, mut dec_g) = (StackSink::new(enc_g), StackSink::new(dec_g));

        let mut bp = Backprop { be, model: self, f: tape.f, grads };
        let mut dh = be.zeros(tape.dec_last.shape())?;
        let d_final = bp.through(d_hidden, bp.site(Decoder, 0, FinalNorm))?;
        let d_final = d_final.as_ref().unwrap_or(d_hidden);
        bp.norm(&tape.dec_last, &self.decoder.final_layer_norm, d_final, &mut dh, dec_g.final_norm.take())?;
        let mut d_enc = be.zeros(tape.enc_out.shape())?;
        for (i, (block, s)) in self.decoder.blocks.iter().zip(&tape.decoder).enumerate().rev() {
            let mut g = dec_g.block(i);
            let d_ff = g.as_deref_mut().map(|g| (&mut g.wi, &mut g.wo));
            let drops = (bp.site(Decoder, i, FfOut), bp.site(Decoder, i, FfHidden));
            let d_x = bp.ffn(&block.ff, (&s.gate_up, &s.inner), &s.x_ff, &dh, drops, d_ff)?;
            bp.norm(&s.h_cross, &block.ff_norm, &d_x, &mut dh, g.as_deref_mut().map(|g| &mut g.ff_norm))?;

            let (ca, ca_norm) = block.cross_attention.as_ref().expect("decoder blocks cross-attend");
            let [d_q, d_kv, d_o, d_norm] = match g.as_deref_mut().and_then(|g| g.cross.as_mut()) {
                Some([q, kv, o, norm]) => [Some(q), Some(kv), Some(o), Some(norm)],
                None => [None, None, None, None],
            };
            let mut d_ctx = be.zeros(s.ctx_cross.out.shape())?;
            let dy = bp.through(&dh, bp.site(Decoder, i, CrossOut))?;
            bp.proj(&ca.o, &s.ctx_cross.out, dy.as_ref().unwrap_or(&dh), Some(&mut d_ctx), d_o)?;
            let spec = self.attn_spec(Some(lengths), l, false, None, bp.site(Decoder, i, CrossProbs));
            let kept = AttnInputs::QAndKv { q: &s.q_cross, kv: &s.kv_cross };
            let (dq, dkv) = bp.attention(kept, &s.ctx_cross, &d_ctx, &spec, None)?.q_kv()?;
            let mut d_x = be.zeros(s.x_cross.shape())?;
            bp.proj(&ca.q, &s.x_cross, &dq, Some(&mut d_x), d_q)?;
            bp.norm(&s.h_self, ca_norm, &d_x, &mut dh, d_norm)?;
            bp.proj(&ca.kv, &tape.enc_out, &dkv, Some(&mut d_enc), d_kv)?;

            let a = &block.self_attention;
            let mut d_ctx = be.zeros(s.ctx.out.shape())?;
            let dy = bp.through(&dh, bp.site(Decoder, i, SelfOut))?;
            bp.proj(&a.o, &s.ctx.out, dy.as_ref().unwrap_or(&dh), Some(&mut d_ctx), g.map(|g| &mut g.o))?;
            let spec = self.attn_spec(None, t, true, Some(false), bp.site(Decoder, i, SelfProbs));
            let table = dec_g.table.as_deref_mut();
            let d_qkv = bp.attention(AttnInputs::Qkv(&s.qkv), &s.ctx, &d_ctx, &spec, table)?.qkv()?;
            let mut d_x = be.zeros(s.x_self.shape())?;
            let mut g = dec_g.block(i);
            bp.proj(&a.qkv, &s.x_self, &d_qkv, Some(&mut d_x), g.as_deref_mut().map(|g| &mut g.qkv))?;
            let d_norm = g.map(|g| &mut g.self_attention_norm);
            bp.norm(&s.h_in, &block.self_attention_norm, &d_x, &mut dh, d_norm)?;
        }
        let d_dec = dh;

        let mut dh = be.zeros(tape.enc_last.shape())?;
        let d_enc = dropped(be, d_enc, bp.site(Encoder, 0, FinalNorm))?;
        bp.norm(&tape.enc_last, &self.encoder.final_layer_norm, &d_enc, &mut dh, enc_g.final_norm.take())?;
        for (i, (block, s)) in self.encoder.blocks.iter().zip(&tape.encoder).enumerate().rev() {
            let mut g = enc_g.block(i);
            let d_ff = g.as_deref_mut().map(|g| (&mut g.wi, &mut g.wo));
            let drops = (bp.site(Encoder, i, FfOut), bp.site(Encoder, i, FfHidden));
            let d_x = bp.ffn(&block.ff, (&s.gate_up, &s.inner), &s.x_ff, &dh, drops, d_ff)?;
            bp.norm(&s.h_mid, &block.ff_norm, &d_x, &mut dh, g.as_deref_mut().map(|g| &mut g.ff_norm))?;
            let a = &block.self_attention;
            let mut d_ctx = be.zeros(s.ctx.out.shape())?;
            let dy = bp.through(&dh, bp.site(Encoder, i, SelfOut))?;
            bp.proj(&a.o, &s.ctx.out, dy.as_ref().unwrap_or(&dh), Some(&mut d_ctx), g.map(|g| &mut g.o))?;
            let spec = self.attn_spec(Some(lengths), l, false, Some(true), bp.site(Encoder, i, SelfProbs));
            let table = enc_g.table.as_deref_mut();
            let d_qkv = bp.attention(AttnInputs::Qkv(&s.qkv), &s.ctx, &d_ctx, &spec, table)?.qkv()?;
            let mut d_x = be.zeros(s.x_attn.shape())?;
            let mut g = enc_g.block(i);
            bp.proj(&a.qkv, &s.x_attn, &d_qkv, Some(&mut d_x), g.as_deref_mut().map(|g| &mut g.qkv))?;
            let d_norm = g.map(|g| &mut g.self_attention_norm);
            bp.norm(&s.h_in, &block.self_attention_norm, &d_x, &mut dh, d_norm)?;
        }
        Ok((d_dec, dh))
    }
}
