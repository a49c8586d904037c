//! The operations every model is written against, once, and the backends that run them: an f32 CPU
//! reference and CUDA. A backend owns its memory; model code only sees the associated types. This
//! file holds the op families' traits (`Device` plus one trait per family, `Backend` their sum);
//! args.rs holds the argument types they take and check.rs their shape rules.

mod args;
mod check;
pub mod cpu;
pub mod cuda;
pub mod relpos;
pub mod rng;

use crate::checkpoint::HostTensor;
use anyhow::Result;
pub use args::*;

/// The shape of a backend tensor, row-major, innermost dimension last.
pub trait Shaped {
    fn shape(&self) -> &[usize];

    fn numel(&self) -> usize {
        self.shape().iter().product()
    }

    /// The size of the last dimension and the number of rows before it.
    fn rows_cols(&self) -> (usize, usize) {
        let s = self.shape();
        let cols = *s.last().unwrap_or(&1);
        (self.numel().checked_div(cols).unwrap_or(0), cols)
    }
}

/// One op of a family trait from one signature: the public method runs the op's shared check
/// (check.rs) and then `$imp`, the method each backend implements, so that no backend writes the
/// checks again.
macro_rules! checked_op {
    ($(#[$m:meta])* fn $name:ident / $imp:ident(&self $(, $arg:ident: $ty:ty)* $(,)?) -> $ret:ty => $check:block) => {
        $(#[$m])*
        fn $name(&self $(, $arg: $ty)*) -> $ret {
            $check
            self.$imp($($arg),*)
        }
        #[doc(hidden)]
        $(#[$m])*
        fn $imp(&self $(, $arg: $ty)*) -> $ret;
    };
}

/// What a backend is before it computes: its tensor types, memory, transfers, synchronisation and
/// recorded steps.
pub trait Device: Sized + Send + Sync {
    /// f32 values: activations, trainable parameters, gradients.
    type Tensor: Shaped + Send + Sync;

    /// A frozen parameter in the backend's storage precision.
    type Weight: Shaped + Send + Sync;

    /// u32 indices: token ids, lengths, flags.
    type Ids: Shaped + Send + Sync;

    fn name(&self) -> String;

    /// The CUDA device ordinal this backend runs on (None on the CPU): NVML's index for GPU stats.
    fn ordinal(&self) -> Option<usize>;

    /// The loss scale a run uses when its settings give none: 1 where products are f32, a power
    /// of two where they are half and small gradients would underflow.
    fn default_loss_scale(&self) -> f32;

    /// Waits for all queued work (for timing; results are read with download, which waits itself).
    fn sync(&self) -> Result<()>;

    /// The most memory the backend has held since the last reset, where it can tell.
    fn peak_memory(&self) -> Option<usize>;

    fn reset_peak_memory(&self);

    /// Opens (`true`) or closes the range a profiler started with collection off records, such as
    /// `ncu --profile-from-start off`; nothing where there is no such profiler.
    fn profiler_range(&self, _open: bool) -> Result<()> {
        Ok(())
    }

    /// Fails with a clear message when the device cannot hold `bytes` more for `what`.
    fn reserve(&self, bytes: usize, what: &str) -> Result<()>;

    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Self::Tensor>;

    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>>;

    fn zeros_as(&self, shape: &[usize], prec: Prec) -> Result<Self::Tensor>;

    fn zeros(&self, shape: &[usize]) -> Result<Self::Tensor> {
        self.zeros_as(shape, Prec::F32)
    }

    fn upload_weight(&self, w: &HostTensor<'_>) -> Result<Self::Weight>;

    fn upload_ids(&self, ids: &[u32], shape: &[usize]) -> Result<Self::Ids>;

    /// The same values under another shape of as many elements (row-major: no data moves).
    fn reshape(&self, t: Self::Tensor, shape: &[usize]) -> Result<Self::Tensor>;

    fn download_ids(&self, ids: &Self::Ids) -> Result<Vec<u32>>;

    /// A recorded decoding step (a CUDA graph; nothing on the CPU).
    type Graph;

    /// Runs `step`, or replays it: the first call records it into `graph` (on backends that can),
    /// later calls replay the recording. A recorded step may only touch buffers that outlive the
    /// graph and must take every position from counters (`Position::Counter`).
    fn run_step(&self, graph: &mut Option<Self::Graph>, step: &mut dyn FnMut() -> Result<()>) -> Result<()>;
}

/// Products with frozen weights (plus LoRA branches) and trainable affine layers, embedding lookups,
/// and their gradients.
pub trait LinearOps: Device {
    /// `table[ids]`: `[..ids] → [..ids, d]`.
    fn embedding(&self, table: &Self::Weight, ids: &Self::Ids) -> Result<Self::Tensor>;

    checked_op! {
        /// `x · wᵀ (+ lora)`: `[.., in] × [out, in] → [.., out]`, stored as `out`.
        fn linear_to / linear_to_impl(
            &self,
            x: &Self::Tensor,
            w: &Self::Weight,
            lora: &[LoraRef<'_, Self>],
            out: Prec,
        ) -> Result<Self::Tensor> => {
            check::linear("linear_to", x.shape(), w.shape(), lora)?;
        }
    }

    fn linear(&self, x: &Self::Tensor, w: &Self::Weight, lora: &[LoraRef<'_, Self>]) -> Result<Self::Tensor> {
        self.linear_to(x, w, lora, Prec::F32)
    }

    checked_op! {
        /// `acc += x · wᵀ (+ lora)`: the residual stream takes a product without a separate add.
        fn linear_add / linear_add_impl(
            &self,
            x: &Self::Tensor,
            w: &Self::Weight,
            lora: &[LoraRef<'_, Self>],
            acc: &mut Self::Tensor,
        ) -> Result<()> => {
            check::linear_add(x.shape(), w.shape(), lora, acc.shape())?;
        }
    }

    checked_op! {
        /// `w + Σ scale · B · A` over each branch's rows (PEFT's merge): one product per projection
        /// instead of three while an adapter stays fixed, as it does through a rollout.
        fn merge_lora / merge_lora_impl(&self, w: &Self::Weight, lora: &[LoraRef<'_, Self>]) -> Result<Self::Weight> => {
            check::linear("merge_lora", &w.shape()[1..], w.shape(), lora)?;
        }
    }

    /// A copy of trainable values in the precision this backend's products read, or None when
    /// they read the f32 values themselves (made once per update, not once per product).
    fn matmul_copy(&self, t: &Self::Tensor) -> Result<Option<Self::Tensor>>;

    checked_op! {
        /// `x · wᵀ + bias` with an f32 (trainable) weight: `[.., in] × [out, in] → [.., out]`.
        fn affine / affine_impl(&self, x: &Self::Tensor, w: &Self::Tensor, bias: Option<&Self::Tensor>) -> Result<Self::Tensor> => {
            check::affine(x.shape(), w.shape(), bias.map(Shaped::shape))?;
        }
    }

    checked_op! {
        /// Backward of `linear_to`/`linear_add` with input `x`: `dx += dy · w` plus each branch's share
        /// (when `dx` is given), the weight's gradient `dw += dyᵀ · x` (f32 `[out, in]`, when given:
        /// full-parameter training), and `grads[i].a += ∂/∂A`, `grads[i].b += ∂/∂B` of branch `lora[i]`.
        #[allow(clippy::too_many_arguments)]
        fn linear_backward / linear_backward_impl(
            &self,
            x: &Self::Tensor,
            w: &Self::Weight,
            lora: &[LoraRef<'_, Self>],
            dy: &Self::Tensor,
            dx: Option<&mut Self::Tensor>,
            dw: Option<&mut Self::Tensor>,
            grads: &mut [LoraGrad<'_, Self>],
        ) -> Result<()> => {
            let (dxs, dws) = (dx.as_deref().map(Shaped::shape), dw.as_deref().map(Shaped::shape));
            check::linear_backward(x.shape(), w.shape(), lora, dy.shape(), dxs, dws, grads)?;
        }
    }

    checked_op! {
        /// Backward of `affine`: `dx += dy · w` (when given), `dw += dyᵀ · x`, `db += Σ dy`.
        fn affine_backward / affine_backward_impl(
            &self,
            x: &Self::Tensor,
            w: &Self::Tensor,
            dy: &Self::Tensor,
            dx: Option<&mut Self::Tensor>,
            dw: &mut Self::Tensor,
            db: Option<&mut Self::Tensor>,
        ) -> Result<()> => {
            check::affine_backward(
                x.shape(),
                w.shape(),
                dy.shape(),
                dx.as_deref().map(Shaped::shape),
                dw.shape(),
                db.as_deref().map(Shaped::shape),
            )?;
        }
    }

    /// Backward of `embedding`: `d_table[ids[i]] += dy[i]`.
    fn embedding_backward(&self, ids: &Self::Ids, dy: &Self::Tensor, d_table: &mut Self::Tensor) -> Result<()>;

    checked_op! {
        /// Overwrites a weight with new values (a trained f32 master), in the weight's precision.
        fn set_weight / set_weight_impl(&self, w: &mut Self::Weight, values: &Self::Tensor) -> Result<()> => {
            check::set_weight(w.shape(), values.shape())?;
        }
    }
}

/// Data movement: the pieces of a stacked projection, row gathers, KV-cache appends and counters.
pub trait LayoutOps: Device {
    checked_op! {
        /// Splits the last dimension into consecutive pieces of the given widths (the outputs of a
        /// stacked projection), each keeping the input's precision.
        fn split_last / split_last_impl(&self, x: &Self::Tensor, widths: &[usize]) -> Result<Vec<Self::Tensor>> => {
            check::split_last(x.shape(), widths)?;
        }
    }

    /// Rows `rows[i]` of `x [N, d]` (x viewed as rows of its last dimension) → `[M, d]`.
    fn gather_rows(&self, x: &Self::Tensor, rows: &Self::Ids) -> Result<Self::Tensor>;

    /// Writes `src [B, n, D]` into rows `pos..pos + n` of `dst [B, cap, D]` (KV-cache append).
    fn write_rows(&self, dst: &mut Self::Tensor, src: &Self::Tensor, pos: Position<'_, Self>) -> Result<()>;

    /// `write_rows` for ids: `src [B, n]` into columns `pos..pos + n` of `dst [B, cap]`.
    fn write_ids(&self, dst: &mut Self::Ids, src: &Self::Ids, pos: Position<'_, Self>) -> Result<()>;

    /// Adds `n` to a one-element counter.
    fn advance(&self, counter: &mut Self::Ids, n: u32) -> Result<()>;

    checked_op! {
        /// Copies `src` into `dst` starting at flat element `offset`.
        fn copy_into / copy_into_impl(&self, dst: &mut Self::Tensor, offset: usize, src: &Self::Tensor) -> Result<()> => {
            check::copy_into(dst.shape(), offset, src.shape())?;
        }
    }

    checked_op! {
        /// The inverse of `split_last`: pieces side by side along the last dimension (f32).
        fn concat_last / concat_last_impl(&self, pieces: &[&Self::Tensor]) -> Result<Self::Tensor> => {
            check::concat_last(&pieces.iter().map(|p| p.shape()).collect::<Vec<_>>())?;
        }
    }
}

/// Element-wise arithmetic, activations, gated-gelu and dropout, with their backward forms.
pub trait ElementwiseOps: Device {
    checked_op! {
        /// `x += bias` on every row (`bias` has the last dimension's size).
        fn bias_add / bias_add_impl(&self, x: &mut Self::Tensor, bias: &Self::Weight) -> Result<()> => {
            check::per_feature("bias_add", x.shape(), bias.shape())?;
        }
    }

    fn activation(&self, x: &Self::Tensor, act: Activation) -> Result<Self::Tensor>;

    /// `x *= s`.
    fn scale_assign(&self, x: &mut Self::Tensor, s: f32) -> Result<()>;

    checked_op! {
        /// `x += y`, same shapes.
        fn add_assign / add_assign_impl(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()> => {
            check::same("add_assign", x.shape(), y.shape())?;
        }
    }

    checked_op! {
        /// `dropout(gelu_new(gate) · up)` where `gate_up [.., 2F]` holds gate then up: `[.., F]`, the
        /// mask over the flat index of the output (T5's FFN dropout, fused). It only feeds `wo`, so
        /// a backend may store it in half.
        fn gated_gelu / gated_gelu_impl(&self, gate_up: &Self::Tensor, dropout: Option<Dropout>) -> Result<Self::Tensor> => {
            check::gated_gelu(gate_up.shape())?;
            check::dropout("gated_gelu", dropout)?;
        }
    }

    /// Inverted dropout `y = x · mask / (1 − p)`; the same call on a gradient is its backward.
    fn dropout(&self, x: &Self::Tensor, d: &Dropout) -> Result<Self::Tensor>;

    checked_op! {
        /// `acc += dropout(x)` (f32): a sublayer's output joins the residual stream through its
        /// dropout in one pass.
        fn dropout_add / dropout_add_impl(&self, acc: &mut Self::Tensor, x: &Self::Tensor, d: &Dropout) -> Result<()> => {
            check::same("dropout_add", acc.shape(), x.shape())?;
            check::dropout("dropout_add", Some(*d))?;
        }
    }

    checked_op! {
        /// Backward of `gated_gelu` under the same dropout: `∂/∂gate_up [.., 2F]` from `dy [.., F]`,
        /// in half where the backend stores half: it feeds only wi's backward products, which read
        /// it in half.
        fn gated_gelu_backward / gated_gelu_backward_impl(
            &self,
            gate_up: &Self::Tensor,
            dy: &Self::Tensor,
            dropout: Option<Dropout>,
        ) -> Result<Self::Tensor> => {
            check::gated_gelu_backward(gate_up.shape(), dy.shape())?;
            check::dropout("gated_gelu_backward", dropout)?;
        }
    }
}

/// RMS norm and LayerNorm, and the RMS norm's input and weight gradients.
pub trait NormOps: Device {
    checked_op! {
        /// LayerNorm with mean subtraction and bias: `(x − μ) · rsqrt(σ² + eps) · w + b`.
        fn layer_norm / layer_norm_impl(&self, x: &Self::Tensor, w: &Self::Weight, b: &Self::Weight, eps: f32) -> Result<Self::Tensor> => {
            check::per_feature("layer_norm", x.shape(), w.shape())?;
            check::per_feature("layer_norm", x.shape(), b.shape())?;
        }
    }

    checked_op! {
        /// T5LayerNorm: `x · rsqrt(mean(x²) + eps) · w` over the last dimension. The result only
        /// feeds matrix products, so a backend may store it in half.
        fn rms_norm / rms_norm_impl(&self, x: &Self::Tensor, w: &Self::Weight, eps: f32) -> Result<Self::Tensor> => {
            check::per_feature("rms_norm", x.shape(), w.shape())?;
        }
    }

    checked_op! {
        /// Backward of `rms_norm` (frozen weight): `dx += ∂/∂x`.
        fn rms_norm_backward / rms_norm_backward_impl(
            &self,
            x: &Self::Tensor,
            w: &Self::Weight,
            eps: f32,
            dy: &Self::Tensor,
            dx: &mut Self::Tensor,
        ) -> Result<()> => {
            check::rms_norm_backward(x.shape(), w.shape(), dy.shape(), dx.shape())?;
        }
    }

    checked_op! {
        /// The weight's gradient of `rms_norm`: `dw += Σ_rows dy · x · rsqrt(mean(x²) + eps)`.
        fn rms_norm_weight_grad / rms_norm_weight_grad_impl(&self, x: &Self::Tensor, eps: f32, dy: &Self::Tensor, dw: &mut Self::Tensor) -> Result<()> => {
            check::rms_norm_weight_grad(x.shape(), dy.shape(), dw.shape())?;
        }
    }
}

/// Attention with T5's relative position bias, and its backward with the bias table's gradient.
pub trait AttentionOps: Device {
    checked_op! {
        /// q `[B, Lq, H·dk]`, k and v `[B, Lk, H·dk]`, as `x` stacks them → `[B, Lq, H·dk]` (which
        /// only feeds the output projection, so a backend may store it in half).
        fn attention / attention_impl(&self, x: AttnInputs<'_, Self::Tensor>, spec: &AttnSpec<'_, Self>) -> Result<Self::Tensor> => {
            let [q, k, v] = check::attention_inputs("attention", x, spec)?;
            check::attention("attention", &q, &k, &v, None, spec)?;
        }
    }

    checked_op! {
        /// `attention` in a pass whose backward will run: also each row's log-sum-exp, which the
        /// backward reads instead of recomputing it.
        fn attention_train / attention_train_impl(
            &self,
            x: AttnInputs<'_, Self::Tensor>,
            spec: &AttnSpec<'_, Self>,
        ) -> Result<Attended<Self::Tensor>> => {
            let [q, k, v] = check::attention_inputs("attention_train", x, spec)?;
            check::attention("attention_train", &q, &k, &v, None, spec)?;
        }
    }

    checked_op! {
        /// Backward of `attention_train` under the same spec from what it kept: dq, dk and dv in
        /// the stacking of `x` (half where the backend stores half), and with `d_table` (the call
        /// has a bias) the bias table's gradient added into it: `d_table[bucket, h] += Σ` of the
        /// scores' gradients over the (query, key) pairs in that bucket.
        fn attention_backward / attention_backward_impl(
            &self,
            x: AttnInputs<'_, Self::Tensor>,
            fwd: &Attended<Self::Tensor>,
            dout: &Self::Tensor,
            spec: &AttnSpec<'_, Self>,
            d_table: Option<&mut Self::Tensor>,
        ) -> Result<AttnGrads<Self::Tensor>> => {
            let shapes = check::attention_inputs("attention_backward", x, spec)?;
            let kept = (fwd.out.shape(), fwd.lse.shape());
            let d_table = d_table.as_deref().map(|t| t.shape());
            check::attention_backward(x, &shapes, kept, dout.shape(), spec, d_table)?;
        }
    }
}

/// Log-probabilities over the vocabulary: chosen tokens' log-probabilities with entropy,
/// cross-entropy, and their gradients.
pub trait LossOps: Device {
    checked_op! {
        /// For `logits [N, V]` and `tokens [N]`: each token's log-probability and each row's entropy.
        fn token_logprobs / token_logprobs_impl(&self, logits: &Self::Tensor, tokens: &Self::Ids) -> Result<(Self::Tensor, Self::Tensor)> => {
            check::per_row("token_logprobs", logits.shape(), tokens.shape(), None)?;
        }
    }

    checked_op! {
        /// Backward of the log-probabilities: `dlogits = dlogp · (onehot(token) − softmax(logits))`.
        fn token_logprobs_backward / token_logprobs_backward_impl(
            &self,
            logits: &Self::Tensor,
            tokens: &Self::Ids,
            dlogp: &Self::Tensor,
        ) -> Result<Self::Tensor> => {
            check::per_row("token_logprobs_backward", logits.shape(), tokens.shape(), Some(dlogp.shape()))?;
        }
    }

    checked_op! {
        /// Token cross-entropy with label smoothing `smoothing` (torch's `CrossEntropyLoss(label_smoothing)`
        /// for each row) of f32 `logits [n, V]` against `targets [n]`: the per-row loss `[n]`, and the
        /// logits' gradient `[n, V]` with each row scaled by `weights[n]` (0 for padding).
        fn cross_entropy / cross_entropy_impl(
            &self,
            logits: &Self::Tensor,
            targets: &Self::Ids,
            weights: &Self::Tensor,
            smoothing: f32,
        ) -> Result<(Self::Tensor, Self::Tensor)> => {
            check::per_row("cross_entropy", logits.shape(), targets.shape(), Some(weights.shape()))?;
        }
    }
}

/// Choosing the next token on the device: Hugging Face's logits processors, greedy or sampled
/// choice, and beam search's step with the reordering of the KV caches it implies.
pub trait SamplingOps: Device {
    checked_op! {
        /// Chooses the next token of every row from `logits [B, V]` at generation step `step`, writing
        /// `tokens [B, 1]` (ready to feed the decoder) and `logprobs [B]`, the chosen ids'
        /// log-probability under the model's own distribution (the raw logits, before any processor).
        /// The choice reads `processed [B, V]` where given (`process_logits`' output), else the
        /// logits. Rows flagged in `finished [B]` get pad and log-prob 0; rows that choose EOS are
        /// flagged. Row `i` draws from RNG stream `streams[i]` (its prompt's index in the data set),
        /// so a sample does not depend on batch composition.
        #[allow(clippy::too_many_arguments)]
        fn select_tokens / select_tokens_impl(
            &self,
            logits: &Self::Tensor,
            processed: Option<&Self::Tensor>,
            spec: &SampleSpec,
            step: Position<'_, Self>,
            streams: &Self::Ids,
            finished: &mut Self::Ids,
            tokens: &mut Self::Ids,
            logprobs: &mut Self::Tensor,
        ) -> Result<()> => {
            check::select_tokens(
                logits.shape(),
                processed.map(Shaped::shape),
                spec.eos,
                [streams.shape(), finished.shape(), tokens.shape(), logprobs.shape()],
            )?;
        }
    }

    checked_op! {
        /// Hugging Face's processors (`spec`) over `logits [N, V]` (or their log-softmax) at step
        /// `step`: row i's decoder ids are the start token then `history[i, ..step]` (`[N, T]`, the
        /// tokens generated so far). Returns the processed scores, shaped as the logits.
        fn process_logits / process_logits_impl(
            &self,
            logits: &Self::Tensor,
            history: &Self::Ids,
            spec: &ProcessSpec,
            step: Position<'_, Self>,
        ) -> Result<Self::Tensor> => {
            check::process_logits(logits.shape(), history.shape(), spec)?;
        }
    }

    checked_op! {
        /// One step of Hugging Face's beam search over `processed [B·K, V]` (`process_logits` of the
        /// log-softmax) for the logits `logits [B·K, V]` of step `step`: per batch item, the best
        /// 2·K continuations of its K beams' scores, the best K that do not finish as its new beams
        /// (`state.src`, `state.next`), those among the first K that finish (EOS, or the last
        /// token allowed) merged into its finished hypotheses, and whether the item is done. Items
        /// already done keep their state (their rows are fed pad and keep their caches).
        fn beam_step / beam_step_impl(
            &self,
            logits: &Self::Tensor,
            processed: &Self::Tensor,
            spec: &BeamSpec,
            step: Position<'_, Self>,
            state: &mut BeamState<Self>,
        ) -> Result<()> => {
            check::beam_step(logits.shape(), processed.shape(), spec, state)?;
        }
    }

    checked_op! {
        /// Rows `0..upto` of every beam's slice of a KV cache `x [B·K, cap, D]` replaced by those of
        /// the beam it continues, `src [B·K]` (after `beam_step`), on the device.
        fn gather_beams / gather_beams_impl(
            &self,
            x: &mut Self::Tensor,
            src: &Self::Ids,
            upto: Position<'_, Self>,
        ) -> Result<()> => {
            check::gather_beams(x.shape(), src.shape(), upto)?;
        }
    }
}

/// The optimiser: Adam over many tensors at once, Adafactor, and Σx² for gradient norms.
pub trait OptimOps: Device {
    checked_op! {
        /// One Adafactor update of every slot (transformers' `Adafactor.step`), the parameter
        /// RMS and the update's RMS reduced on the device.
        fn adafactor / adafactor_impl(&self, slots: &mut [AdafactorSlot<'_, Self>], h: &AdafactorStep) -> Result<()> => {
            check::adafactor(slots, h)?;
        }
    }

    checked_op! {
        /// One Adam update of every slot: a step's whole optimiser in one pass where the backend can,
        /// since one launch per tensor of a few thousand values costs more than the update itself.
        fn adam / adam_impl(&self, slots: &mut [AdamSlot<'_, Self>], h: &AdamStep) -> Result<()> => {
            check::adam(slots)?;
        }
    }

    /// Σ x² over every element of every tensor of `xs`, for gradient norms: one read-back for all
    /// of them, so a step's norm waits on the device once, not once per tensor.
    fn sum_squares(&self, xs: &[&Self::Tensor]) -> Result<f64>;

    /// Every tensor of `xs` set to zero (a step's gradients before its backward adds into them),
    /// in one pass where the backend can: a step keeps its gradients' memory instead of
    /// allocating them again for every minibatch.
    fn zero_grads(&self, xs: &mut [&mut Self::Tensor]) -> Result<()>;
}

/// Every family at once: what model code is written against (`B: Backend`). Any type that
/// implements them all is a `Backend`.
pub trait Backend:
    Device + LinearOps + LayoutOps + ElementwiseOps + NormOps + AttentionOps + LossOps + SamplingOps + OptimOps
{
}

impl<T: Device + LinearOps + LayoutOps + ElementwiseOps + NormOps + AttentionOps + LossOps + SamplingOps + OptimOps>
    Backend for T
{
}

/// The traits whose methods a caller on a concrete backend (`Cpu`, `Cuda`) needs in scope.
pub mod prelude {
    pub use super::{
        AttentionOps, Backend, Device, ElementwiseOps, LayoutOps, LinearOps, LossOps, NormOps, OptimOps, SamplingOps,
    };
}
