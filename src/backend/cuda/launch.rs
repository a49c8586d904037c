//! Launch geometry, written once for the kernels and the launches that must agree with them:
//! build.rs turns every `pub const` below into a `#define` of the generated `launch.cuh` that
//! kernels/ include, so block sizes, tiles and limits cannot drift apart between .cu and Rust.
//! Values are plain integer expressions that C and Rust read alike.

/// Threads per block of the grid-stride kernels.
pub const ELEMENTWISE_THREADS: u32 = 256;
/// At most this many blocks of them: 16 per SM of an H200's 132 keep every SM busy, and more only
/// add scheduling.
pub const ELEMENTWISE_MAX_BLOCKS: usize = 132 * 16;
/// Threads per row of the row-wise norms and column sums.
pub const ROW_THREADS: u32 = 256;
/// Rows per block of `rms_weight_grad`: tall inputs spread over the machine.
pub const RMS_ROWS: u32 = 64;
/// Threads per row of the log-probability kernels (token log-probs, their backward, cross-entropy).
pub const LP_THREADS: u32 = 512;
/// Threads per row of log-softmax and of `select_tokens` (whose prefix sums hold one value each).
pub const VOCAB_THREADS: u32 = 1024;
/// Threads of one block of `adam_multi`, and the values each thread updates.
pub const ADAM_THREADS: u32 = 256;
pub const ADAM_PER_THREAD: u32 = 4;
/// Threads of one block of the passes over a table of tensor spans (`sum_squares_multi`,
/// `zero_multi`), and the values each thread takes.
pub const SPAN_THREADS: u32 = 256;
pub const SPAN_PER_THREAD: u32 = 8;
/// Threads of one block of the Adafactor kernels, and the values one block of its element-wise
/// passes takes.
pub const ADAFACTOR_THREADS: u32 = 256;
pub const ADAFACTOR_PER_BLOCK: u32 = 256 * 8;
/// Rows whose column sums one thread of `adafactor_col_partials` adds before the ordered finish.
pub const ADAFACTOR_COL_ROWS: u32 = 64;
/// Queries (or keys) per block of the many-query attention kernels, forward and backward; the plain
/// forms run one thread per row.
pub const ATTN_ROWS: u32 = 64;
/// Keys per shared-memory tile of the plain attention forward.
pub const ATTN_PREFILL_KEYS: u32 = 32;
/// Threads of the tensor-core attention kernels: 4 warps of 16 rows each.
pub const ATTN_MMA_THREADS: u32 = 128;
/// Threads of the decoding attention (one block per query row).
pub const ATTN_ROW_THREADS: u32 = 128;
/// Rows of relative-position slots in which a block of the key-side attention backward gathers the
/// bias table's gradient: one per warp of the tensor-core form (the plain form's two warps use the
/// first two).
pub const ATTN_REL_WARPS: u32 = ATTN_MMA_THREADS / 32;
/// Row stride, in floats, of the dS blocks (16 keys × ATTN_ROWS queries per warp) that the
/// tensor-core form stages for the bias gradient: 8 past the row keeps both the fragments' 8-byte
/// stores and the lanes' diagonal reads free of bank conflicts.
pub const ATTN_DS_STRIDE: u32 = ATTN_ROWS + 8;
/// The dynamic shared memory the bias gradient may take beside the kernels' own tiles (at most
/// 2 · 64 · (64 + 8) halves and 1 KiB of statistics), within SHARED_MEMORY_LIMIT.
pub const ATTN_BIAS_GRAD_SMEM: u32 = 28 << 10;
/// The largest head size the attention kernels take.
pub const ATTN_MAX_DK: u32 = 128;
/// The shared memory a launch may ask for without opting in to more.
pub const SHARED_MEMORY_LIMIT: u32 = 48 << 10;
/// The most beams per batch item: each thread of `beam_step` keeps its 2 · MAX_BEAMS best
/// candidates in registers.
pub const MAX_BEAMS: u32 = 16;
/// Threads of one block of `beam_step` (one block per batch item).
pub const BEAM_THREADS: u32 = 256;
