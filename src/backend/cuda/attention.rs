//! The CUDA attention of kernels/attention.cu: the forward forms (tensor cores, plain tiles,
//! decoding) and the backward with the bias table's gradient, with the one `AttnParams` they share.

use super::*;

/// Mirrors `AttnParams` in kernels/attention.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct AttnParams {
    key_lengths: u64,
    counter: u64,
    bias_table: u64,
    bucket_lut: u64,
    drop_key: u64,
    b: i32,
    lq: i32,
    lk: i32,
    cap: i32,
    h: i32,
    dk: i32,
    ldq: i32,
    ldkv: i32,
    q_offset: i32,
    causal: i32,
    max_distance: i32,
    scale: f32,
    drop_p: f32,
}
// SAFETY: plain old data with the kernel's layout.
unsafe impl DeviceRepr for AttnParams {}

/// Where one call's q, k and v start in half and how many elements apart their rows are, as its
/// `AttnInputs` stack them.
struct Operands<'a> {
    q: u64,
    k: u64,
    v: u64,
    ldq: usize,
    ldkv: usize,
    /// B, Lq and the rows of k and v (a cache's capacity).
    b: usize,
    lq: usize,
    cap: usize,
    /// The half copies of f32 inputs, alive while the launches read them.
    _held: Vec<std::borrow::Cow<'a, CudaSlice<f16>>>,
}

impl Cuda {
    fn bucket_lut(&self, bidirectional: bool, buckets: usize, max_distance: usize) -> Result<u64> {
        let mut luts = self.bucket_luts.lock().expect("bucket table lock");
        let key = (bidirectional, buckets, max_distance);
        if let std::collections::hash_map::Entry::Vacant(e) = luts.entry(key) {
            let md = max_distance as i64;
            let lut: Vec<u32> =
                (-md..=md).map(|rel| relative_bucket(rel, bidirectional, buckets, max_distance) as u32).collect();
            e.insert(self.gpu.upload(&lut)?);
        }
        Ok(self.gpu.ptr(&luts[&key]))
    }
    /// The addresses and row strides of `x`'s q, k and v, each `inner` = H·dk wide.
    fn operands<'a>(&self, x: AttnInputs<'a, CudaTensor>, inner: usize) -> Result<Operands<'a>> {
        // The address `parts` widths of `inner` halves along a row from `base`.
        let at = |base: u64, parts: usize| base + (parts * inner * std::mem::size_of::<f16>()) as u64;
        let (b, lq) = match x {
            AttnInputs::Qkv(q) | AttnInputs::QAndKv { q, .. } | AttnInputs::Apart { q, .. } => (q.shape[0], q.shape[1]),
        };
        let x = match x {
            AttnInputs::Qkv(qkv) => {
                let h = self.as_half(qkv)?;
                let base = self.gpu.ptr(&h);
                let (k, v) = (at(base, 1), at(base, 2));
                Operands { q: base, k, v, ldq: 3 * inner, ldkv: 3 * inner, b, lq, cap: lq, _held: vec![h] }
            }
            AttnInputs::QAndKv { q, kv } => {
                let (qh, kvh) = (self.as_half(q)?, self.as_half(kv)?);
                let (qp, kvp) = (self.gpu.ptr(&qh), self.gpu.ptr(&kvh));
                let (ldq, ldkv, cap) = (inner, 2 * inner, kv.shape[1]);
                Operands { q: qp, k: kvp, v: at(kvp, 1), ldq, ldkv, b, lq, cap, _held: vec![qh, kvh] }
            }
            AttnInputs::Apart { q, k, v } => {
                let (qh, kh, vh) = (self.as_half(q)?, self.as_half(k)?, self.as_half(v)?);
                let (qp, kp, vp) = (self.gpu.ptr(&qh), self.gpu.ptr(&kh), self.gpu.ptr(&vh));
                let cap = k.shape[1];
                Operands { q: qp, k: kp, v: vp, ldq: inner, ldkv: inner, b, lq, cap, _held: vec![qh, kh, vh] }
            }
        };
        Ok(x)
    }

    /// The kernels' parameter block for one call on `x` under `spec`, the position from its
    /// counter when it has one.
    fn attn_params(&self, x: &Operands<'_>, spec: &AttnSpec<'_, Self>) -> Result<AttnParams> {
        let (q_offset, counter) = self.position(spec.q_offset);
        let (bias_table, bucket_lut, max_distance) = match &spec.bias {
            Some(rb) => (
                self.gpu.ptr(&rb.table.buf),
                self.bucket_lut(rb.bidirectional, rb.num_buckets, rb.max_distance)?,
                rb.max_distance as i32,
            ),
            None => (0, 0, 0),
        };
        Ok(AttnParams {
            key_lengths: spec.key_lengths.map(|l| self.gpu.ptr(&l.buf)).unwrap_or(0),
            counter,
            bias_table,
            bucket_lut,
            drop_key: spec.dropout.map_or(0, |d| d.key()),
            b: x.b as i32,
            lq: x.lq as i32,
            lk: spec.kv_len as i32,
            cap: x.cap as i32,
            h: spec.heads as i32,
            dk: spec.d_kv as i32,
            ldq: x.ldq as i32,
            ldkv: x.ldkv as i32,
            q_offset,
            causal: spec.causal as i32,
            max_distance,
            scale: spec.scale,
            drop_p: spec.dropout.map_or(0.0, |d| d.p),
        })
    }

    /// The forward: the decoding form for a few queries at inference, else the tensor-core or the
    /// plain many-query form, which with `keep_lse` also write each row's log-sum-exp
    /// `[B, H, Lq]`.
    fn attention_forward(
        &self,
        x: AttnInputs<'_, CudaTensor>,
        spec: &AttnSpec<'_, Self>,
        keep_lse: bool,
    ) -> Result<(CudaTensor, Option<CudaTensor>)> {
        let (h, dk) = (spec.heads, spec.d_kv);
        ensure!(dk <= ATTN_MAX_DK as usize, "attention: d_kv {dk} > {ATTN_MAX_DK} is not supported on CUDA");
        let x = self.operands(x, h * dk)?;
        let (b, lq, cap) = (x.b, x.lq, x.cap);
        let params = self.attn_params(&x, spec)?;
        let out = self.empty(&[b, lq, h * dk], Prec::Half)?;
        let lse_t = keep_lse.then(|| self.empty(&[b, h, lq], Prec::F32)).transpose()?;
        let lse = lse_t.as_ref().map_or(0, |t| self.ptr_t(t));
        let (qp, kp, vp, op) = (x.q, x.k, x.v, self.ptr_t(&out));
        // The decoding form serves inference only: dropout and training take the many-query forms.
        if lq <= 4 && spec.dropout.is_none() && !keep_lse {
            let vec = dk == 64 || dk == 32;
            let width = if vec { dk / 8 } else { dk };
            let groups = ATTN_ROW_THREADS as usize / width;
            let smem = (dk + cap + groups * dk) * 4;
            ensure!(
                smem <= SHARED_MEMORY_LIMIT as usize,
                "attention: {cap} keys exceed the decode kernel's shared memory"
            );
            let cfg = LaunchConfig {
                grid_dim: (h as u32, b as u32, lq as u32),
                block_dim: (ATTN_ROW_THREADS, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            let name = if vec { format!("attention_decode_{dk}") } else { "attention_decode_any".to_string() };
            self.gpu.launch(&name, cfg, &[&qp, &kp, &vp, &op, &params])?;
        } else if dk == 64 || dk == 32 {
            let cfg = LaunchConfig {
                grid_dim: (lq.div_ceil(ATTN_ROWS as usize) as u32, h as u32, b as u32),
                block_dim: (ATTN_MMA_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            self.gpu.launch(&format!("attention_mma_{dk}"), cfg, &[&qp, &kp, &vp, &op, &lse, &params])?;
        } else {
            let dk_tile = if dk <= 32 {
                32
            } else if dk <= 64 {
                64
            } else {
                128
            };
            let cfg = LaunchConfig {
                grid_dim: (lq.div_ceil(ATTN_ROWS as usize) as u32, h as u32, b as u32),
                block_dim: (ATTN_ROWS, 1, 1),
                shared_mem_bytes: (2 * ATTN_PREFILL_KEYS as usize * dk * 4) as u32,
            };
            let name = format!("attention_prefill_f16_{dk_tile}");
            self.gpu.launch(&name, cfg, &[&qp, &kp, &vp, &op, &lse, &params])?;
        }
        Ok((out, lse_t))
    }
}

impl AttentionOps for Cuda {
    fn attention_impl(&self, x: AttnInputs<'_, Self::Tensor>, spec: &AttnSpec<'_, Self>) -> Result<Self::Tensor> {
        Ok(self.attention_forward(x, spec, false)?.0)
    }

    fn attention_train_impl(
        &self,
        x: AttnInputs<'_, Self::Tensor>,
        spec: &AttnSpec<'_, Self>,
    ) -> Result<Attended<Self::Tensor>> {
        match self.attention_forward(x, spec, true)? {
            (out, Some(lse)) => Ok(Attended { out, lse }),
            (_, None) => bail!("attention_train: the forward kept no log-sum-exp"),
        }
    }

    /// Two launches (kernels/attention.cu says how the work is split): per `ATTN_ROWS` queries, D = dO·O
    /// and dq; then per `ATTN_ROWS` keys, dk and dv, and with `d_table` the bias gradient
    /// per relative position, which a third launch folds into the table's buckets. q, k, v and dout
    /// are read as half. The gradients take the inputs' stacking and row strides.
    fn attention_backward_impl(
        &self,
        x: AttnInputs<'_, CudaTensor>,
        fwd: &Attended<CudaTensor>,
        dout: &CudaTensor,
        spec: &AttnSpec<'_, Self>,
        d_table: Option<&mut CudaTensor>,
    ) -> Result<AttnGrads<CudaTensor>> {
        let (h, dk) = (spec.heads, spec.d_kv);
        ensure!(
            (1..=ATTN_MAX_DK as usize).contains(&dk),
            "attention_backward: d_kv {dk} is outside 1..={ATTN_MAX_DK} on CUDA"
        );
        let inner = h * dk;
        let grads = match x {
            AttnInputs::Qkv(t) => AttnGrads::Qkv(self.empty(&t.shape, Prec::Half)?),
            AttnInputs::QAndKv { q, kv } => {
                AttnGrads::QAndKv { q: self.empty(&q.shape, Prec::Half)?, kv: self.empty(&kv.shape, Prec::Half)? }
            }
            AttnInputs::Apart { .. } => bail!("attention_backward: q, k and v apart (the check refuses them)"),
        };
        let x = self.operands(x, inner)?;
        let (b, lq, cap) = (x.b, x.lq, x.cap);
        ensure!(h <= 65535 && b <= 65535, "attention_backward: {h} heads × {b} rows exceed the grid");
        // dq, dk and dv start where q, k and v do in the same stacking.
        let (dq, dkp, dvp) = match &grads {
            AttnGrads::Qkv(t) => {
                let base = self.ptr_t(t);
                (base, base + x.k - x.q, base + x.v - x.q)
            }
            AttnGrads::QAndKv { q, kv } => {
                let base = self.ptr_t(kv);
                (self.ptr_t(q), base, base + x.v - x.k)
            }
        };
        if b == 0 || h == 0 {
            return Ok(grads);
        }
        // Head sizes of whole m16n8k16 tiles take the tensor cores; others the f32 form, whose row
        // size is fixed at compile time.
        let mma = matches!(dk, 16 | 32 | 64);
        let (form, threads) = match dk {
            _ if mma => (format!("mma_{dk}"), ATTN_MMA_THREADS),
            1..=32 => ("plain_32".to_string(), ATTN_ROWS),
            33..=64 => ("plain_64".to_string(), ATTN_ROWS),
            _ => ("plain_128".to_string(), ATTN_ROWS),
        };
        let table = match (d_table, &spec.bias) {
            (Some(t), Some(rb)) => Some((self.grad_ptr(t, "attention_backward d_table")?, rb)),
            _ => None,
        };
        // The bias gradient's slots per relative position [H, 2·max_distance + 1], and the key-side
        // launch's shared memory for them (kernels/attention.cu, the bias table's gradient).
        let slots = table.map_or(0, |(_, rb)| 2 * rb.max_distance + 1);
        let d_rel = if slots > 0 { Some(self.gpu.alloc_zeros::<f32>(h * slots)?) } else { None };
        let staging = if mma { (ATTN_REL_WARPS * 16 * ATTN_DS_STRIDE) as usize } else { 0 };
        let rel_smem = if slots > 0 { (staging + ATTN_REL_WARPS as usize * slots) * 4 } else { 0 };
        ensure!(
            rel_smem <= ATTN_BIAS_GRAD_SMEM as usize,
            "attention_backward: the bias gradient at max_distance {} needs {rel_smem} bytes of shared memory, over \
             {ATTN_BIAS_GRAD_SMEM}",
            slots / 2
        );
        let (gh, oh) = (self.as_half(dout)?, self.as_half(&fwd.out)?);
        let params = self.attn_params(&x, spec)?;
        // Per (row, head, query): D = Σ p·dp, from the first launch for the second.
        let dsum = self.gpu.alloc::<f32>(b * h * lq)?;
        let grid = |rows: usize, smem: usize| LaunchConfig {
            grid_dim: (rows.div_ceil(ATTN_ROWS as usize) as u32, h as u32, b as u32),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let (qp, kp, vp, gp, op) = (x.q, x.k, x.v, self.gpu.ptr(&gh), self.gpu.ptr(&oh));
        ensure!(
            matches!(fwd.lse.buf, Buf::F32(_)),
            "attention_backward: the forward's lse must be f32, as attention_train keeps it"
        );
        let (lp, dp) = (self.ptr_t(&fwd.lse), self.gpu.ptr(&dsum));
        let rp = d_rel.as_ref().map_or(0, |r| self.gpu.ptr(r));
        if lq > 0 {
            self.gpu.launch(
                &format!("attention_backward_dq_{form}"),
                grid(lq, 0),
                &[&qp, &kp, &vp, &op, &gp, &dq, &lp, &dp, &params],
            )?;
        }
        if cap > 0 {
            self.gpu.launch(
                &format!("attention_backward_dkdv_{form}"),
                grid(cap, rel_smem),
                &[&qp, &kp, &vp, &gp, &dkp, &dvp, &lp, &dp, &rp, &params],
            )?;
        }
        if let Some((tp, rb)) = table {
            let cfg = LaunchConfig {
                grid_dim: (h as u32, 1, 1),
                block_dim: (rb.num_buckets.next_multiple_of(32).min(1024) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            self.gpu.launch(
                "attention_bias_fold",
                cfg,
                &[&rp, &tp, &params.bucket_lut, &(rb.max_distance as i32), &(rb.num_buckets as i32), &(h as i32)],
            )?;
        }
        Ok(grads)
    }
}
