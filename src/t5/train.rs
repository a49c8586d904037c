//! Training passes through T5, written once over the backend: a teacher-forced forward that keeps
//! what the backward needs (the tape), and the hand-written backward from the decoder's final
//! states back through every layer of the decoder and the encoder to the LoRA matrices. The frozen
//! weights get no gradients; the embeddings, whose inputs are token ids, end the chain.

use super::model::{DenseReluDense, Fwd, Proj, SelfAttention, T5};
use crate::backend::{AttnSpec, Backend, LoraGrad, Position, Prec, Shaped};
use anyhow::{Result, ensure};

/// One encoder block's saved activations.
pub struct EncoderLayerTape<B: Backend> {
    /// The residual stream entering the block, and after its attention.
    h_in: B::Tensor,
    h_mid: B::Tensor,
    /// The normed inputs of the attention and of the FFN.
    x_attn: B::Tensor,
    x_ff: B::Tensor,
    q: B::Tensor,
    k: B::Tensor,
    v: B::Tensor,
    ctx: B::Tensor,
    gate_up: B::Tensor,
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
    q: B::Tensor,
    k: B::Tensor,
    v: B::Tensor,
    ctx: B::Tensor,
    q_cross: B::Tensor,
    k_cross: B::Tensor,
    v_cross: B::Tensor,
    ctx_cross: B::Tensor,
    gate_up: B::Tensor,
    inner: B::Tensor,
}

/// Everything `backward` reads, from one `forward_train`.
pub struct Tape<B: Backend> {
    encoder: Vec<EncoderLayerTape<B>>,
    /// The encoder's residual stream before its final norm, and its output.
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
    pub fn zeros(be: &B, model: &mut T5<B>) -> Result<Self> {
        let mut slots = Vec::new();
        for (_, part) in model.modules_mut() {
            let g = match &part.lora {
                Some(l) => Some((be.zeros(l.a.shape())?, be.zeros(l.b.shape())?)),
                None => None,
            };
            slots.push(g);
        }
        Ok(Self { slots })
    }

    /// The (A, B) gradients in slot order, for clipping, the optimiser and tests.
    pub fn tensors(&self) -> impl Iterator<Item = &(B::Tensor, B::Tensor)> {
        self.slots.iter().flatten()
    }

    pub fn tensors_mut(&mut self) -> impl Iterator<Item = &mut (B::Tensor, B::Tensor)> {
        self.slots.iter_mut().flatten()
    }
}

impl<B: Backend> T5<B> {
    fn attn_spec<'a>(
        &'a self,
        lengths: Option<&'a B::Ids>,
        keys: usize,
        causal: bool,
        bias: Option<bool>,
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
        }
    }

    fn split3(&self, be: &B, x: &B::Tensor) -> Result<(B::Tensor, B::Tensor, B::Tensor)> {
        let inner = self.config.inner_dim();
        let mut p = be.split_last(x, &[inner, inner, inner])?;
        let v = p.pop().expect("three parts");
        let k = p.pop().expect("three parts");
        Ok((p.pop().expect("three parts"), k, v))
    }

    fn project_train(&self, be: &B, x: &B::Tensor, p: &Proj<B>, f: Fwd, out: Prec) -> Result<B::Tensor> {
        be.linear_to(x, &p.weight, &self.loras(p, f), out)
    }

    fn project_add_train(&self, be: &B, x: &B::Tensor, p: &Proj<B>, f: Fwd, acc: &mut B::Tensor) -> Result<()> {
        be.linear_add(x, &p.weight, &self.loras(p, f), acc)
    }

    /// The teacher-forced pass of `dec_ids [B, T]` against prompts `ids [B, L]`, keeping the tape:
    /// returns the decoder's final states `[B, T, d]`. Adapters run unmerged, with dropout when
    /// `f.dropout_seed` is set.
    pub fn forward_train(
        &self,
        be: &B,
        ids: &B::Ids,
        lengths: &B::Ids,
        dec_ids: &B::Ids,
        f: Fwd,
    ) -> Result<(B::Tensor, Tape<B>)> {
        let c = &self.config;
        let eps = c.layer_norm_epsilon;
        let l = ids.shape()[1];
        let t = dec_ids.shape()[1];
        let inner = c.inner_dim();

        let mut h = be.embedding(&self.shared, ids)?;
        let mut encoder = Vec::with_capacity(self.encoder.blocks.len());
        for block in &self.encoder.blocks {
            let a: &SelfAttention<B> = &block.self_attention;
            let x_attn = be.rms_norm(&h, &block.self_attention_norm, eps)?;
            let (q, k, v) = self.split3(be, &self.project_train(be, &x_attn, &a.qkv, f, Prec::Half)?)?;
            let ctx = be.attention(&q, &k, &v, &self.attn_spec(Some(lengths), l, false, Some(true)))?;
            let h_in = self.residual(be, &mut h, &ctx, &a.o, f)?;
            let x_ff = be.rms_norm(&h, &block.ff_norm, eps)?;
            let gate_up = self.project_train(be, &x_ff, &block.ff.wi, f, Prec::F32)?;
            let ff_inner = be.gated_gelu(&gate_up)?;
            let h_mid = self.residual(be, &mut h, &ff_inner, &block.ff.wo, f)?;
            encoder.push(EncoderLayerTape { h_in, h_mid, x_attn, x_ff, q, k, v, ctx, gate_up, inner: ff_inner });
        }
        let enc_out = be.rms_norm(&h, &self.encoder.final_layer_norm, eps)?;
        let enc_last = h;

        let mut h = be.embedding(&self.shared, dec_ids)?;
        let mut decoder = Vec::with_capacity(self.decoder.blocks.len());
        for block in &self.decoder.blocks {
            let a = &block.self_attention;
            let x_self = be.rms_norm(&h, &block.self_attention_norm, eps)?;
            let (q, k, v) = self.split3(be, &self.project_train(be, &x_self, &a.qkv, f, Prec::Half)?)?;
            let ctx = be.attention(&q, &k, &v, &self.attn_spec(None, t, true, Some(false)))?;
            let h_in = self.residual(be, &mut h, &ctx, &a.o, f)?;
            let (ca, ca_norm) = block.cross_attention.as_ref().expect("decoder blocks cross-attend");
            let x_cross = be.rms_norm(&h, ca_norm, eps)?;
            let q_cross = self.project_train(be, &x_cross, &ca.q, f, Prec::Half)?;
            let mut kv = be.split_last(&self.project_train(be, &enc_out, &ca.kv, f, Prec::Half)?, &[inner, inner])?;
            let v_cross = kv.pop().expect("two parts");
            let k_cross = kv.pop().expect("two parts");
            let ctx_cross =
                be.attention(&q_cross, &k_cross, &v_cross, &self.attn_spec(Some(lengths), l, false, None))?;
            let h_self = self.residual(be, &mut h, &ctx_cross, &ca.o, f)?;
            let x_ff = be.rms_norm(&h, &block.ff_norm, eps)?;
            let gate_up = self.project_train(be, &x_ff, &block.ff.wi, f, Prec::F32)?;
            let ff_inner = be.gated_gelu(&gate_up)?;
            let h_cross = self.residual(be, &mut h, &ff_inner, &block.ff.wo, f)?;
            decoder.push(DecoderLayerTape {
                h_in,
                h_self,
                h_cross,
                x_self,
                x_cross,
                x_ff,
                q,
                k,
                v,
                ctx,
                q_cross,
                k_cross,
                v_cross,
                ctx_cross,
                gate_up,
                inner: ff_inner,
            });
        }
        let hidden = be.rms_norm(&h, &self.decoder.final_layer_norm, eps)?;
        Ok((hidden, Tape { encoder, enc_last, enc_out, decoder, dec_last: h, f }))
    }

    /// `h ← h + p(x)` in a new tensor, returning the old residual (the input of the sublayer's
    /// norm, which the backward reads).
    fn residual(&self, be: &B, h: &mut B::Tensor, x: &B::Tensor, p: &Proj<B>, f: Fwd) -> Result<B::Tensor> {
        let mut next = be.zeros(h.shape())?;
        be.copy_into(&mut next, 0, h)?;
        self.project_add_train(be, x, p, f, &mut next)?;
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
    /// `linear_backward` of projection `p`, its LoRA gradients taken out of `grads` for the call.
    fn proj(&mut self, p: &Proj<B>, x: &B::Tensor, dy: &B::Tensor, dx: Option<&mut B::Tensor>) -> Result<()> {
        let loras = self.model.loras(p, self.f);
        let slots: Vec<usize> =
            p.parts.iter().filter(|part| part.lora.is_some() && self.f.lora).map(|part| part.slot).collect();
        let mut taken: Vec<(B::Tensor, B::Tensor)> =
            slots.iter().map(|&s| self.grads.slots[s].take().expect("a gradient for every adapted module")).collect();
        let result = {
            let mut refs: Vec<LoraGrad<'_, B>> = taken.iter_mut().map(|(a, b)| LoraGrad { a, b }).collect();
            self.be.linear_backward(x, &p.weight, &loras, dy, dx, &mut refs)
        };
        for (s, g) in slots.into_iter().zip(taken) {
            self.grads.slots[s] = Some(g);
        }
        result
    }

    /// Through `wo(gelu_new(wi_0 x) · wi_1 x)`: the gradient at the FFN's normed input.
    fn ffn(
        &mut self,
        ff: &DenseReluDense<B>,
        gate_up: &B::Tensor,
        inner: &B::Tensor,
        x: &B::Tensor,
        dh: &B::Tensor,
    ) -> Result<B::Tensor> {
        let mut d_inner = self.be.zeros(inner.shape())?;
        self.proj(&ff.wo, inner, dh, Some(&mut d_inner))?;
        let d_gate_up = self.be.gated_gelu_backward(gate_up, &d_inner)?;
        let mut d_x = self.be.zeros(x.shape())?;
        self.proj(&ff.wi, x, &d_gate_up, Some(&mut d_x))?;
        Ok(d_x)
    }
}

impl<B: Backend> T5<B> {
    /// Backpropagates `d_hidden` (the gradient at the decoder's final states) through the tape
    /// into `grads`, accumulating.
    pub fn backward(
        &self,
        be: &B,
        tape: &Tape<B>,
        lengths: &B::Ids,
        d_hidden: &B::Tensor,
        grads: &mut LoraGrads<B>,
    ) -> Result<()> {
        let c = &self.config;
        let eps = c.layer_norm_epsilon;
        let l = tape.enc_out.shape()[1];
        let t = d_hidden.shape()[1];
        ensure!(tape.decoder.len() == self.decoder.blocks.len(), "the tape does not belong to this model");

        let mut bp = Backprop { be, model: self, f: tape.f, grads };
        let mut dh = be.zeros(tape.dec_last.shape())?;
        be.rms_norm_backward(&tape.dec_last, &self.decoder.final_layer_norm, eps, d_hidden, &mut dh)?;
        let mut d_enc = be.zeros(tape.enc_out.shape())?;
        for (block, s) in self.decoder.blocks.iter().zip(&tape.decoder).rev() {
            let d_x = bp.ffn(&block.ff, &s.gate_up, &s.inner, &s.x_ff, &dh)?;
            be.rms_norm_backward(&s.h_cross, &block.ff_norm, eps, &d_x, &mut dh)?;

            let (ca, ca_norm) = block.cross_attention.as_ref().expect("decoder blocks cross-attend");
            let mut d_ctx = be.zeros(s.ctx_cross.shape())?;
            bp.proj(&ca.o, &s.ctx_cross, &dh, Some(&mut d_ctx))?;
            let spec = self.attn_spec(Some(lengths), l, false, None);
            let (dq, dk, dv) = be.attention_backward(&s.q_cross, &s.k_cross, &s.v_cross, &d_ctx, &spec)?;
            let mut d_x = be.zeros(s.x_cross.shape())?;
            bp.proj(&ca.q, &s.x_cross, &dq, Some(&mut d_x))?;
            be.rms_norm_backward(&s.h_self, ca_norm, eps, &d_x, &mut dh)?;
            let d_kv = be.concat_last(&[&dk, &dv])?;
            bp.proj(&ca.kv, &tape.enc_out, &d_kv, Some(&mut d_enc))?;

            let a = &block.self_attention;
            let mut d_ctx = be.zeros(s.ctx.shape())?;
            bp.proj(&a.o, &s.ctx, &dh, Some(&mut d_ctx))?;
            let (dq, dk, dv) =
                be.attention_backward(&s.q, &s.k, &s.v, &d_ctx, &self.attn_spec(None, t, true, Some(false)))?;
            let d_qkv = be.concat_last(&[&dq, &dk, &dv])?;
            let mut d_x = be.zeros(s.x_self.shape())?;
            bp.proj(&a.qkv, &s.x_self, &d_qkv, Some(&mut d_x))?;
            be.rms_norm_backward(&s.h_in, &block.self_attention_norm, eps, &d_x, &mut dh)?;
        }

        let mut dh = be.zeros(tape.enc_last.shape())?;
        be.rms_norm_backward(&tape.enc_last, &self.encoder.final_layer_norm, eps, &d_enc, &mut dh)?;
        for (block, s) in self.encoder.blocks.iter().zip(&tape.encoder).rev() {
            let d_x = bp.ffn(&block.ff, &s.gate_up, &s.inner, &s.x_ff, &dh)?;
            be.rms_norm_backward(&s.h_mid, &block.ff_norm, eps, &d_x, &mut dh)?;
            let a = &block.self_attention;
            let mut d_ctx = be.zeros(s.ctx.shape())?;
            bp.proj(&a.o, &s.ctx, &dh, Some(&mut d_ctx))?;
            let spec = self.attn_spec(Some(lengths), l, false, Some(true));
            let (dq, dk, dv) = be.attention_backward(&s.q, &s.k, &s.v, &d_ctx, &spec)?;
            let d_qkv = be.concat_last(&[&dq, &dk, &dv])?;
            let mut d_x = be.zeros(s.x_attn.shape())?;
            bp.proj(&a.qkv, &s.x_attn, &d_qkv, Some(&mut d_x))?;
            be.rms_norm_backward(&s.h_in, &block.self_attention_norm, eps, &d_x, &mut dh)?;
        }
        Ok(())
    }
}
