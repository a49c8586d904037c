//! The CPU reference of attention with T5's relative position bias: the forward (with each row's
//! log-sum-exp for training) and the backward with the bias table's gradient, which recomputes
//! each row's softmax and draws its dropout mask again.

use super::*;

/// One query row of an attention backward: the recomputed probabilities over its visible keys,
/// their dropout factors (0 or 1/(1 − p); 1 without dropout), the gradient at the probabilities
/// dp_j = factor_j · dout·v_j, and the scores' gradient without the `scale` factor,
/// ds_j = p_j (dp_j − Σ p·dp).
struct AttnRow<'a> {
    b: usize,
    head: usize,
    i: usize,
    dout: &'a [f32],
    p: &'a [f32],
    drop: &'a [f32],
    dp: &'a [f32],
    avg: f32,
}

impl AttnRow<'_> {
    fn ds(&self, j: usize) -> f32 {
        self.p[j] * (self.dp[j] - self.avg)
    }

    /// The probability after dropout, which multiplied v_j in the forward.
    fn kept(&self, j: usize) -> f32 {
        self.p[j] * self.drop[j]
    }
}

/// The dropout factors of query row `i` of head `hh` of batch row `bi` over keys `0..n`, out of
/// `lk` keys per row (`AttnSpec::dropout`'s index); all 1 without dropout.
fn drop_row(spec: &AttnSpec<'_, Cpu>, (bi, hh, i): (usize, usize, usize), lq: usize, lk: usize, n: usize) -> Vec<f32> {
    match spec.dropout {
        Some(d) => {
            let key = d.key();
            let row = ((bi * spec.heads + hh) * lq + i) * lk;
            (0..n).map(|j| dropout_factor(d.p, key, (row + j) as u64)).collect()
        }
        None => vec![1.0; n],
    }
}

/// Where the queries of a call sit, how many keys it sees (`Position::Counter` resolved), and
/// each batch row's real keys among them.
fn keys(q: &CpuTensor<f32>, spec: &AttnSpec<'_, Cpu>) -> (usize, usize, Vec<usize>) {
    let q_offset = at(spec.q_offset);
    let lk = match spec.q_offset {
        Position::At(_) => spec.kv_len,
        Position::Counter(_) => q_offset + q.shape[1],
    };
    let key_len = match spec.key_lengths {
        Some(l) => l.data.iter().map(|&n| (n as usize).min(lk)).collect(),
        None => vec![lk; q.shape[0]],
    };
    (q_offset, lk, key_len)
}

/// The position bias `[h][lq][lk]` of queries `q_offset..q_offset + lq` against keys `0..lk`,
/// looked up once per call rather than once per head and row.
fn bias_grid(rb: &RelBias<'_, Cpu>, h: usize, lq: usize, lk: usize, q_offset: usize) -> Vec<f32> {
    let mut out = vec![0.0; h * lq * lk];
    for i in 0..lq {
        for j in 0..lk {
            let rel = j as i64 - (q_offset + i) as i64;
            let bucket = relative_bucket(rel, rb.bidirectional, rb.num_buckets, rb.max_distance);
            for hh in 0..h {
                out[(hh * lq + i) * lk + j] = rb.table.data[bucket * h + hh];
            }
        }
    }
    out
}

/// Recomputes the softmax of every query row of an attention call (bias, padding and causality as
/// the forward applies them) and hands each row to `f`: the walk both backward forms share.
fn attention_rows(
    q: &CpuTensor<f32>,
    k: &CpuTensor<f32>,
    v: &CpuTensor<f32>,
    dout: &CpuTensor<f32>,
    spec: &AttnSpec<'_, Cpu>,
    mut f: impl FnMut(AttnRow<'_>),
) -> Result<()> {
    let (h, dk) = (spec.heads, spec.d_kv);
    let inner = h * dk;
    let lq = q.shape[1];
    let cap = k.shape[1];
    let (q_offset, lk, key_len) = keys(q, spec);
    let mut p = vec![0.0f32; lk];
    for (bi, &len) in key_len.iter().enumerate() {
        for hh in 0..h {
            for i in 0..lq {
                let visible = if spec.causal { (q_offset + i + 1).min(lk) } else { lk }.min(len);
                if visible == 0 {
                    continue;
                }
                let qi = &q.data[(bi * lq + i) * inner + hh * dk..][..dk];
                let di = &dout.data[(bi * lq + i) * inner + hh * dk..][..dk];
                let mut max = f32::NEG_INFINITY;
                for (j, pj) in p.iter_mut().enumerate().take(visible) {
                    let kj = &k.data[(bi * cap + j) * inner + hh * dk..][..dk];
                    let mut s = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * spec.scale;
                    if let Some(rb) = &spec.bias {
                        let rel = j as i64 - (q_offset + i) as i64;
                        let bucket = relative_bucket(rel, rb.bidirectional, rb.num_buckets, rb.max_distance);
                        s += rb.table.data[bucket * h + hh];
                    }
                    *pj = s;
                    max = max.max(s);
                }
                let sum: f32 = p[..visible]
                    .iter_mut()
                    .map(|s| {
                        *s = (*s - max).exp();
                        *s
                    })
                    .sum();
                p[..visible].iter_mut().for_each(|s| *s /= sum);
                // dp_j = factor_j · dout_i · v_j
                let drop = drop_row(spec, (bi, hh, i), lq, lk, visible);
                let dp: Vec<f32> = (0..visible)
                    .map(|j| {
                        let vj = &v.data[(bi * cap + j) * inner + hh * dk..][..dk];
                        drop[j] * di.iter().zip(vj).map(|(a, b)| a * b).sum::<f32>()
                    })
                    .collect();
                let avg: f32 = p[..visible].iter().zip(&dp).map(|(a, b)| a * b).sum();
                f(AttnRow { b: bi, head: hh, i, dout: di, p: &p[..visible], drop: &drop, dp: &dp, avg });
            }
        }
    }
    Ok(())
}

/// The forward: the output, and each row's log-sum-exp of its scores (+∞ without keys).
fn forward(
    q: &CpuTensor<f32>,
    k: &CpuTensor<f32>,
    v: &CpuTensor<f32>,
    spec: &AttnSpec<'_, Cpu>,
) -> Result<Attended<CpuTensor<f32>>> {
    let (h, dk) = (spec.heads, spec.d_kv);
    let inner = h * dk;
    let (b, lq) = (q.shape[0], q.shape[1]);
    let cap = k.shape[1];
    let (q_offset, lk, key_len) = keys(q, spec);
    // A counter's position is only known here, so its cache bound is checked here too.
    ensure!(lk <= cap, "attention: kv_len {lk} exceeds the {cap} rows of k");
    let bias = spec.bias.as_ref().map(|rb| bias_grid(rb, h, lq, lk, q_offset));
    let mut out = vec![0.0f32; b * lq * inner];
    let mut lse = vec![f32::INFINITY; b * h * lq];
    out.par_chunks_mut(lq * inner).zip(lse.par_chunks_mut(h * lq)).enumerate().for_each(|(bi, (ob, lb))| {
        let mut scores = vec![0.0f32; lk];
        for hh in 0..h {
            for i in 0..lq {
                let qi = &q.data[(bi * lq + i) * inner + hh * dk..][..dk];
                let visible = if spec.causal { (q_offset + i + 1).min(lk) } else { lk };
                let mut max = f32::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate() {
                    if j >= visible || j >= key_len[bi] {
                        *s = f32::NEG_INFINITY;
                        continue;
                    }
                    let kj = &k.data[(bi * cap + j) * inner + hh * dk..][..dk];
                    let mut dot: f32 = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * spec.scale;
                    if let Some(bias) = &bias {
                        dot += bias[(hh * lq + i) * lk + j];
                    }
                    *s = dot;
                    max = max.max(dot);
                }
                let o = &mut ob[i * inner + hh * dk..][..dk];
                o.fill(0.0);
                if max == f32::NEG_INFINITY {
                    continue;
                }
                let drop = spec.dropout.map(|_| drop_row(spec, (bi, hh, i), lq, lk, lk));
                let mut sum = 0.0;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                lb[hh * lq + i] = max + sum.ln();
                for (j, s) in scores.iter().enumerate() {
                    if *s == 0.0 {
                        continue;
                    }
                    let p = s / sum * drop.as_ref().map_or(1.0, |d| d[j]);
                    let vj = &v.data[(bi * cap + j) * inner + hh * dk..][..dk];
                    o.iter_mut().zip(vj).for_each(|(a, b)| *a += p * b);
                }
            }
        }
    });
    Ok(Attended { out: CpuTensor::new(out, &q.shape)?, lse: CpuTensor::new(lse, &[b, h, lq])? })
}

/// q, k and v as plain tensors, split from the projection's stacking that `x` names.
fn apart(x: AttnInputs<'_, CpuTensor<f32>>, inner: usize) -> Result<[CpuTensor<f32>; 3]> {
    let split = |t: &CpuTensor<f32>, parts: usize| Cpu.split_last(t, &vec![inner; parts]);
    Ok(match x {
        AttnInputs::Qkv(qkv) => split(qkv, 3)?.try_into().map_err(|_| anyhow!("q|k|v splits into three"))?,
        AttnInputs::QAndKv { q, kv } => {
            let [k, v]: [CpuTensor<f32>; 2] = split(kv, 2)?.try_into().map_err(|_| anyhow!("k|v splits into two"))?;
            [q.clone(), k, v]
        }
        AttnInputs::Apart { q, k, v } => [q.clone(), k.clone(), v.clone()],
    })
}

impl AttentionOps for Cpu {
    fn attention_impl(&self, x: AttnInputs<'_, Self::Tensor>, spec: &AttnSpec<'_, Self>) -> Result<Self::Tensor> {
        let [q, k, v] = apart(x, spec.heads * spec.d_kv)?;
        Ok(forward(&q, &k, &v, spec)?.out)
    }

    fn attention_train_impl(
        &self,
        x: AttnInputs<'_, Self::Tensor>,
        spec: &AttnSpec<'_, Self>,
    ) -> Result<Attended<Self::Tensor>> {
        let [q, k, v] = apart(x, spec.heads * spec.d_kv)?;
        forward(&q, &k, &v, spec)
    }

    fn attention_backward_impl(
        &self,
        x: AttnInputs<'_, Self::Tensor>,
        // The reference recomputes each row's softmax rather than read what the forward kept.
        _fwd: &Attended<Self::Tensor>,
        dout: &Self::Tensor,
        spec: &AttnSpec<'_, Self>,
        mut d_table: Option<&mut Self::Tensor>,
    ) -> Result<AttnGrads<Self::Tensor>> {
        let [q, k, v] = apart(x, spec.heads * spec.d_kv)?;
        let (q, k, v) = (&q, &k, &v);
        let (h, dk) = (spec.heads, spec.d_kv);
        let (inner, lq, cap) = (h * dk, q.shape[1], k.shape[1]);
        let q_offset = at(spec.q_offset);
        let mut dq = vec![0.0f32; q.data.len()];
        let mut dkk = vec![0.0f32; k.data.len()];
        let mut dv = vec![0.0f32; v.data.len()];
        attention_rows(q, k, v, dout, spec, |r| {
            let qi = &q.data[(r.b * lq + r.i) * inner + r.head * dk..][..dk];
            for j in 0..r.p.len() {
                let ds = r.ds(j) * spec.scale;
                let base = (r.b * cap + j) * inner + r.head * dk;
                for t in 0..dk {
                    dv[base + t] += r.kept(j) * r.dout[t];
                    dq[(r.b * lq + r.i) * inner + r.head * dk + t] += ds * k.data[base + t];
                    dkk[base + t] += ds * qi[t];
                }
                if let (Some(table), Some(rb)) = (d_table.as_deref_mut(), &spec.bias) {
                    let rel = j as i64 - (q_offset + r.i) as i64;
                    let bucket = relative_bucket(rel, rb.bidirectional, rb.num_buckets, rb.max_distance);
                    table.data[bucket * h + r.head] += r.ds(j);
                }
            }
        })?;
        let (dq, dk, dv) =
            (CpuTensor::new(dq, &q.shape)?, CpuTensor::new(dkk, &k.shape)?, CpuTensor::new(dv, &v.shape)?);
        Ok(match x {
            AttnInputs::Qkv(_) => AttnGrads::Qkv(self.concat_last(&[&dq, &dk, &dv])?),
            AttnInputs::QAndKv { .. } => AttnGrads::QAndKv { q: dq, kv: self.concat_last(&[&dk, &dv])? },
            AttnInputs::Apart { .. } => bail!("attention_backward: q, k and v apart (the check refuses them)"),
        })
    }
}
