#!/usr/bin/env python3
"""Writes tests/fixtures/ppo_step/: one complete TRL 0.4.7 PPO step of a tiny seq2seq policy (T5 v1.1 + PEFT LoRA
+ a value head), computed in PyTorch, with every input the Rust engine needs to replay it and every intermediate
it should match. tests/fixtures/ppo_step/README.md lists the files and keys.

What is transcribed from TRL 0.4.7 (`PPOTrainer.step` for an `AutoModelForSeq2SeqLMWithValueHead` wrapping a
PEFT model), in TRL's order:
  1. `prepare_model_inputs`: queries and responses right-padded with pad 0 (DataCollatorForLanguageModeling over
     T5's tokenizer), attention masks 1 on each tensor's own tokens. Responses are what `_generate_batched` hands
     back for an encoder-decoder: generate's output starting with the decoder start token 0, cut after the first
     EOS (`remove_padding=True`), or running to max_new_tokens without EOS.
  2. `batched_forward_pass` under no_grad in chunks of mini_batch_size, adapter ON (old log-probs, values, masks),
     then again inside peft's `disable_adapter()` (reference log-probs). Log-probs of `decoder_input_ids[:, 1:]`
     from `logits[:, :-1]`; values from the value head on `decoder_hidden_states[-1]`; the mask from
     `decoder_attention_mask` shifted left by one, with `start = 1` and `end = attention_mask.sum() - 1` (the
     seq2seq first-token quirk: the first generated token's log-prob and value are masked out); everything
     `[:, :-1]`.
  3. `compute_rewards` with the adaptive controller's current coefficient.
  4. For each of ppo_epochs, for each minibatch: zero_grad, `batched_forward_pass` with grad (return_logits),
     `loss` (GAE + whitening on the minibatch, clipped losses, ratio-threshold skip, stats), backward,
     `Adam.step()` (no gradient clipping, no early stopping).
     DEPARTURE FROM TRL: TRL's minibatch DataLoader shuffles (`shuffle=True`); here the minibatches are taken IN
     ORDER, rows 0-1 then rows 2-3, in both epochs, so that the fixture is reproducible without TRL's RNG.
  5. `record_step_stats`, then the adaptive KL controller's update with `objective/kl` and batch_size.
The arithmetic between the forward passes and the optimiser is tools/ppo_reference.py's (imported, not copied).

Dropout is off everywhere: the T5 model runs in eval mode (its config also says dropout_rate 0.0), the LoRA
dropout is 0.0 and the value head has no dropout (TRL's `summary_dropout_prob` would otherwise be 0.1).

The script ends with a self-check: a float64 copy of the policy, reloaded from the fixture's files, recomputes the
first minibatch's loss; its autograd gradients must agree with the float32 ones, and central finite differences on
3 random LoRA entries (and one value-head entry) must agree with both.

Run from the repository root with the oracle's Python (tools/requirements-oracle.txt):
    /opt/oracle/bin/python tools/make_ppo_step_fixture.py
Re-running writes identical bytes.
"""
import json
import os
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import torch
import transformers
import peft
from safetensors.torch import load_file, save_file
from transformers import T5Config, T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5LayerNorm

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)
import ppo_reference as ref  # noqa: E402  (TRL 0.4.7's PPO arithmetic)
from make_fixtures import save_model  # noqa: E402  (the T5 fixtures' way of writing a model directory)

PINNED = {"torch": "2.11.0", "transformers": "5.17.0", "peft": "0.21.0"}
OUT = os.path.normpath(os.path.join(TOOLS, "..", "tests", "fixtures", "ppo_step"))
PAD, EOS, DECODER_START = 0, 1, 0
SEED = 20240607

T5_KWARGS = dict(vocab_size=320, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2, num_decoder_layers=2,
                 relative_attention_num_buckets=8, relative_attention_max_distance=20)
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q", "v"], bias="none")
LORA_B_STD = 0.1

# PPOConfig (TRL 0.4.7 field names) for this fixture.
PPO = SimpleNamespace(batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-3, init_kl_coef=0.2,
                      adap_kl_ctrl=True, target=6.0, horizon=10000.0, gamma=1.0, lam=0.95, cliprange=0.2,
                      cliprange_value=0.2, vf_coef=0.1, ratio_threshold=10.0, max_grad_norm=None,
                      early_stopping=False, kl_penalty="kl", gradient_accumulation_steps=1)
MINIBATCH_ROWS = [[0, 1], [2, 3]]  # in order, no shuffling, the same in every epoch

# The rollout: query lengths (EOS included), generated-token counts (EOS included when `with_eos`), scores.
QUERY_LENGTHS = [11, 6, 14, 9]
GENERATED = [6, 9, 3, 7]  # row 1 runs to max_new_tokens = 9 without EOS
WITH_EOS = [True, False, True, True]
SCORES = [0.3, -1.2, 0.8, 0.0]
FD_EPS = 1e-6


def check_versions():
    have = {m: sys.modules[m].__version__ for m in PINNED}
    print("versions: " + ", ".join(f"{m} {v}" for m, v in have.items()) + f", numpy {np.__version__}")
    for mod, want in PINNED.items():
        if have[mod].split("+")[0] != want:
            print(f"warning: {mod} {have[mod]} is not the pinned {want}; fixtures may differ", file=sys.stderr)


def f32(t):
    return t.detach().to(torch.float32).contiguous()


def peft_key(name):
    """A PeftModel parameter name as peft's save_pretrained writes it (adapter name dropped)."""
    return name.replace(".default.", ".")


# --- the model: TRL's AutoModelForSeq2SeqLMWithValueHead over a PEFT model ------------------------------

class ValueHead(torch.nn.Module):
    """trl ValueHead with summary_dropout_prob = 0 (dropout off): `summary(hidden)`."""

    def __init__(self, d_model):
        super().__init__()
        self.summary = torch.nn.Linear(d_model, 1)

    def forward(self, hidden_states):
        if hidden_states.dtype != self.summary.weight.dtype:
            hidden_states = hidden_states.to(self.summary.weight.dtype)
        return self.summary(hidden_states)


class Seq2SeqWithValueHead(torch.nn.Module):
    """The arithmetic of `AutoModelForSeq2SeqLMWithValueHead.forward`: (lm_logits, loss, value)."""

    def __init__(self, pretrained_model, v_head):
        super().__init__()
        self.pretrained_model = pretrained_model
        self.v_head = v_head

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, **kwargs):
        kwargs["past_key_values"] = past_key_values
        out = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                                    **kwargs)
        last_hidden_state = out.decoder_hidden_states[-1]
        value = self.v_head(last_hidden_state).squeeze(-1)
        lm_logits = out.logits
        # TRL: "force upcast in fp32 if logits are in half-precision" (`!= float32`); written for half precision
        # only, so that the float64 self-check copy stays float64. A no-op for the float32 fixture.
        if lm_logits.dtype in (torch.float16, torch.bfloat16):
            lm_logits = lm_logits.float()
        return lm_logits, out.loss, value


def build_and_save(gen):
    """Random tiny FLAN-style T5 + PEFT LoRA (random B) + value head, written under OUT/model and OUT/adapter."""
    torch.manual_seed(SEED)
    cfg = T5Config(feed_forward_proj="gated-gelu", decoder_start_token_id=DECODER_START, eos_token_id=EOS,
                   pad_token_id=PAD, dropout_rate=0.0, **T5_KWARGS)
    model = T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        # Widen the relative-bias table so the bias visibly shapes attention at these tiny sizes.
        for stack in (model.encoder, model.decoder):
            stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.normal_(0.0, 1.0, generator=gen)
        # Untied lm_head (FLAN style), scaled so that the policy's entropy is moderate.
        model.lm_head.weight = torch.nn.Parameter(0.25 * torch.randn(cfg.vocab_size, cfg.d_model, generator=gen))
    model.config.scale_decoder_outputs = False
    cfg_dict = cfg.to_dict()
    for k in ["transformers_version", "_name_or_path", "architectures", "id2label", "label2id",
              "scale_decoder_outputs"]:
        cfg_dict.pop(k, None)
    cfg_dict["architectures"] = ["T5ForConditionalGeneration"]
    cfg_dict["tie_word_embeddings"] = False
    save_model(model, cfg_dict, os.path.join(OUT, "model"), torch.float32, 1, store_lm_head=True)

    lcfg = peft.LoraConfig(task_type="SEQ_2_SEQ_LM", **LORA)
    pmodel = peft.get_peft_model(model, lcfg).eval()  # A: peft's kaiming-uniform init (global RNG, seeded above)
    with torch.no_grad():
        for n, p in pmodel.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, LORA_B_STD, generator=gen)
    adapter_dir = os.path.join(OUT, "adapter")
    pmodel.save_pretrained(adapter_dir)
    os.remove(os.path.join(adapter_dir, "README.md"))
    v_w = 0.3 * torch.randn(1, cfg.d_model, generator=gen)
    v_b = torch.randn(1, generator=gen)
    save_file({"v_head.summary.weight": v_w, "v_head.summary.bias": v_b},
              os.path.join(adapter_dir, "value_head.safetensors"), metadata={"format": "pt"})
    return Seq2SeqWithValueHead(pmodel, value_head_from(v_w, v_b)).eval()


def value_head_from(w, b):
    head = ValueHead(w.shape[1])
    with torch.no_grad():
        head.summary.weight.copy_(w)
        head.summary.bias.copy_(b)
    return head


def load_policy(dtype):
    """The policy as the fixture's files define it: base model, PEFT adapter (trainable), value head."""
    base = T5ForConditionalGeneration.from_pretrained(os.path.join(OUT, "model"), dtype=dtype).eval()
    pmodel = peft.PeftModel.from_pretrained(base, os.path.join(OUT, "adapter"), is_trainable=True).eval()
    vh = load_file(os.path.join(OUT, "adapter", "value_head.safetensors"))
    policy = Seq2SeqWithValueHead(pmodel, value_head_from(vh["v_head.summary.weight"], vh["v_head.summary.bias"]))
    policy = policy.to(dtype).eval()
    for p in policy.v_head.parameters():
        p.requires_grad_(True)
    return policy


def trainable(policy):
    """(saved name, parameter) in `model.parameters()` order: what TRL's Adam is built over."""
    out = []
    for n, p in policy.named_parameters():
        if p.requires_grad:
            out.append((peft_key(n[len("pretrained_model."):]) if n.startswith("pretrained_model.") else n, p))
    return out


# --- TRL 0.4.7 PPOTrainer, seq2seq path -----------------------------------------------------------------

def pad_right(seqs):
    """DataCollatorForLanguageModeling(tokenizer, mlm=False) on [{input_ids, attention_mask=ones}] with T5's
    tokenizer: right padding with pad 0 to the longest; the labels it also builds are popped by TRL."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, : len(s)] = s
        mask[j, : len(s)] = 1
    return ids, mask


def prepare_model_inputs(queries, responses):
    input_ids, attention_mask = pad_right(queries)
    decoder_input_ids, decoder_attention_mask = pad_right(responses)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": decoder_input_ids,
            "decoder_attention_mask": decoder_attention_mask}


def batched_forward_pass(model, queries, responses, model_inputs, fbs, return_logits=False):
    bs = len(queries)
    all_logprobs, all_logits, all_masks, all_values = [], [], [], []
    for i in range(int(bs / fbs)):
        input_kwargs = {key: value[i * fbs : (i + 1) * fbs] for key, value in model_inputs.items()}
        logits, _, values = model(**input_kwargs)
        input_ids = input_kwargs["decoder_input_ids"]
        attention_mask = input_kwargs["decoder_attention_mask"]
        logprobs = ref.logprobs_from_logits(logits[:, :-1, :], input_ids[:, 1:])
        masks = torch.zeros_like(attention_mask)
        masks[:, :-1] = attention_mask[:, 1:]
        for j in range(fbs):
            start = 1  # "Decoder sentence starts always in the index 1 after padding"
            end = attention_mask[j, :].sum() - 1
            masks[j, :start] = 0
            masks[j, end:] = 0
        assert torch.equal(masks[:, :-1], ref.seq2seq_masks(attention_mask))
        if return_logits:
            all_logits.append(logits)
        all_values.append(values)
        all_logprobs.append(logprobs)
        all_masks.append(masks)
    return (
        torch.cat(all_logprobs),
        torch.cat(all_logits)[:, :-1] if return_logits else None,
        torch.cat(all_values)[:, :-1],
        torch.cat(all_masks)[:, :-1],
    )


# --- the rollout ------------------------------------------------------------------------------------------

@torch.no_grad()
def make_rollout(policy, gen):
    """Queries: random ids ending with EOS. Responses: sampled from the policy (adapter on) with pad and EOS
    excluded, EOS forced as the last token of the rows that have one: [0, g1 .. gn] as `_generate_batched`
    returns them."""
    vocab = T5_KWARGS["vocab_size"]
    queries = []
    for n in QUERY_LENGTHS:
        q = torch.randint(3, vocab, (n,), generator=gen)
        q[-1] = EOS
        queries.append(q)
    responses = []
    for q, n, eos in zip(queries, GENERATED, WITH_EOS):
        ids = torch.tensor([[DECODER_START]])
        for t in range(n):
            logits = policy.pretrained_model(input_ids=q[None], attention_mask=torch.ones_like(q)[None],
                                             decoder_input_ids=ids).logits[0, -1]
            logits[[PAD, EOS]] = -float("inf")
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
            if eos and t == n - 1:
                nxt[0] = EOS
            ids = torch.cat([ids, nxt[None]], dim=1)
        responses.append(ids[0])
    scores = [torch.tensor(s, dtype=torch.float32) for s in SCORES]
    return queries, responses, scores


def rust_style_mask(generated, cols):
    """src/ppo/mask.rs `response_mask_from_lengths(generated, cols, FirstToken::Drop)`: slots 1..n."""
    m = torch.zeros(len(generated), cols, dtype=torch.long)
    for j, n in enumerate(generated):
        m[j, 1:n] = 1
    return m


# --- the step ---------------------------------------------------------------------------------------------

def ppo_step(policy, queries, responses, scores):
    fbs = PPO.mini_batch_size
    model_inputs = prepare_model_inputs(queries, responses)
    with torch.no_grad():
        old_logprobs, old_logits, values, masks = batched_forward_pass(policy, queries, responses, model_inputs,
                                                                       fbs, return_logits=True)
        with policy.pretrained_model.disable_adapter():
            ref_logprobs, ref_logits, _, _ = batched_forward_pass(policy, queries, responses, model_inputs, fbs,
                                                                  return_logits=True)
    kl_ctl = ref.AdaptiveKLController(PPO.init_kl_coef, PPO.target, PPO.horizon)
    kl_coef_before = kl_ctl.value
    rewards, non_score_reward = ref.compute_rewards(PPO, kl_ctl.value, scores, old_logprobs, ref_logprobs, masks)

    params = trainable(policy)
    optimizer = torch.optim.Adam([p for _, p in params], lr=PPO.learning_rate)
    minibatches, train_stats = [], []
    for epoch in range(PPO.ppo_epochs):
        for m, rows in enumerate(MINIBATCH_ROWS):
            idx = torch.tensor(rows)
            mb_inputs = {k: v[idx] for k, v in model_inputs.items()}
            logprobs, logits, vpreds, _ = batched_forward_pass(
                policy, [queries[r] for r in rows], [responses[r] for r in rows], mb_inputs, fbs, return_logits=True)
            optimizer.zero_grad()
            loss_p, loss_v, stats, advantages, returns, skipped = ref.loss(
                PPO, old_logprobs[idx], values[idx], rewards[idx], logits, vpreds, logprobs, masks[idx])
            loss = loss_p + loss_v
            loss.backward()
            grads = {name: p.grad.detach().clone() for name, p in params}
            optimizer.step()
            train_stats.append(stats)
            ratio = torch.exp(logprobs - old_logprobs[idx])
            minibatches.append({
                "epoch": epoch, "minibatch": m, "rows": rows, "skipped": skipped,
                "pg_loss": loss_p.item(), "vf_loss": stats["loss/value"], "vf_term": loss_v.item(),
                "total": stats["loss/total"], "loss_backward": loss.item(), "stats": stats,
                "tensors": {"logprobs": logprobs, "vpreds": vpreds, "advantages": advantages, "returns": returns,
                            "ratio": ratio},
                "grads": grads,
                "params_after": {name: p.detach().clone() for name, p in params},
            })
            print(f"epoch {epoch} minibatch {m} rows {rows}: loss {loss.item():+.6f} (pg {loss_p.item():+.6f}, "
                  f"vf {stats['loss/value']:.6f}), clipfrac {stats['policy/clipfrac']:.3f}, "
                  f"val clipfrac {stats['val/clipfrac']:.3f}, ratio mean {stats['policy/ratio_mean']:.6f}")

    step_stats = ref.record_step_stats(kl_ctl.value, scores, old_logprobs, ref_logprobs, non_score_reward, masks,
                                       train_stats)
    if PPO.adap_kl_ctrl:
        kl_ctl.update(ref.seed_era_float(step_stats["objective/kl"]), PPO.batch_size)
    return {
        "model_inputs": model_inputs, "old_logprobs": old_logprobs, "old_logits": old_logits,
        "ref_logprobs": ref_logprobs, "ref_logits": ref_logits, "values": values, "masks": masks,
        "rewards": rewards, "non_score_reward": non_score_reward, "minibatches": minibatches,
        "step_stats": step_stats, "kl_coef_before": kl_coef_before, "kl_coef_after": float(kl_ctl.value),
    }


# --- the self-check ---------------------------------------------------------------------------------------

def rms_norm_keeping_f64(self, hidden_states):
    """T5LayerNorm.forward with the variance in float64 for float64 inputs (transformers takes it in float32,
    which would leave float32 rounding in the float64 copy and swamp the finite differences). Identical to
    transformers' for float32 inputs."""
    variance = hidden_states.to(torch.promote_types(hidden_states.dtype, torch.float32)).pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    if self.weight.dtype in [torch.float16, torch.bfloat16]:
        hidden_states = hidden_states.to(self.weight.dtype)
    return self.weight * hidden_states


def self_check(step, queries, responses, gen):
    """float64 policy from the fixture's files; the first minibatch's loss, its autograd gradients against the
    float32 ones, and central finite differences on 3 random LoRA entries and 1 value-head entry."""
    original = T5LayerNorm.forward
    T5LayerNorm.forward = rms_norm_keeping_f64
    try:
        return _self_check(step, queries, responses, gen)
    finally:
        T5LayerNorm.forward = original


def _self_check(step, queries, responses, gen):
    policy = load_policy(torch.float64)
    params = dict(trainable(policy))
    mb = step["minibatches"][0]
    rows = mb["rows"]
    idx = torch.tensor(rows)
    mb_inputs = {k: v[idx] for k, v in step["model_inputs"].items()}
    old = {k: step[k][idx].to(torch.float64) for k in ["old_logprobs", "values", "rewards"]}
    mask = step["masks"][idx]

    def minibatch_loss():
        logprobs, logits, vpreds, _ = batched_forward_pass(
            policy, [queries[r] for r in rows], [responses[r] for r in rows], mb_inputs, len(rows), return_logits=True)
        loss_p, loss_v, _, _, _, _ = ref.loss(PPO, old["old_logprobs"], old["values"], old["rewards"], logits, vpreds,
                                              logprobs, mask)
        return loss_p + loss_v, logprobs

    loss, logprobs = minibatch_loss()
    assert torch.allclose(logprobs, old["old_logprobs"], rtol=1e-5, atol=1e-5), "float64 log-probs disagree"
    loss.backward()
    worst = 0.0
    for name, g32 in mb["grads"].items():
        g64 = params[name].grad
        assert g32.abs().max() > 0, f"{name}: zero gradient"
        err = float((g64 - g32.to(torch.float64)).abs().max() / g64.abs().max())
        worst = max(worst, err)
        assert err < 1e-4, f"{name}: float32 gradient differs from float64 by {err:.2e} of its scale"

    lora = [n for n in params if "lora_" in n]
    picks = []
    a_names = [n for n in lora if "lora_A" in n]
    b_names = [n for n in lora if "lora_B" in n]
    encoder = [n for n in lora if ".encoder." in n]
    # A random LoRA A entry, a random LoRA B entry, a random encoder LoRA entry (reached only through the
    # cross-attention), and a value-head entry.
    for pool in (a_names, b_names, encoder, ["v_head.summary.weight"]):
        name = pool[int(torch.randint(len(pool), (1,), generator=gen))]
        flat_i = int(torch.randint(params[name].numel(), (1,), generator=gen))
        picks.append((name, flat_i))
    checks = []
    for name, i in picks:
        p = params[name]
        with torch.no_grad():
            orig = p.view(-1)[i].item()
            p.view(-1)[i] = orig + FD_EPS
            up = minibatch_loss()[0].item()
            p.view(-1)[i] = orig - FD_EPS
            down = minibatch_loss()[0].item()
            p.view(-1)[i] = orig
        fd = (up - down) / (2 * FD_EPS)
        g64 = p.grad.view(-1)[i].item()
        g32 = mb["grads"][name].view(-1)[i].item()
        scale = mb["grads"][name].abs().max().item()
        assert abs(fd - g64) <= 1e-6 * scale + 1e-5 * abs(g64), f"{name}[{i}]: fd {fd} vs float64 autograd {g64}"
        assert abs(fd - g32) <= 1e-4 * scale, f"{name}[{i}]: fd {fd} vs float32 autograd {g32}"
        checks.append({"param": name, "flat_index": i, "finite_difference": fd, "autograd_f64": g64,
                       "autograd_f32": g32})
        print(f"  fd check {name}[{i}]: fd {fd:+.8e}, f64 {g64:+.8e}, f32 {g32:+.8e}")
    print(f"self-check passed: float32 gradients within {worst:.1e} of float64 (relative to each tensor's max)")
    return {"fd_eps": FD_EPS, "max_rel_err_f32_vs_f64_grads": worst, "entries": checks}


README = """\
# tests/fixtures/ppo_step

One complete TRL 0.4.7 PPO step (`PPOTrainer.step`, seq2seq path, `AutoModelForSeq2SeqLMWithValueHead` over a PEFT
LoRA model) of a tiny random T5, computed in PyTorch. Written by `tools/make_ppo_step_fixture.py` (run with
`/opt/oracle/bin/python`; re-running writes identical bytes); do not edit by hand.

## Setting

- Policy: T5 v1.1 (gated-gelu), vocab 320, d_model 64, d_kv 16, 4 heads, d_ff 128, 2 encoder + 2 decoder layers,
  relative buckets 8 / max distance 20, untied `lm_head` (`"tie_word_embeddings": false`, `lm_head.weight` stored,
  no d_model^-0.5 rescale), fp32, `dropout_rate` 0, run in eval mode.
- LoRA (PEFT): r 4, lora_alpha 8 (scaling 2), dropout 0, bias none, `q` and `v` of every attention (encoder self,
  decoder self, decoder cross). A as PEFT initialises it (kaiming-uniform), B random (normal, std 0.1).
- Value head: `Linear(64, 1)` on `decoder_hidden_states[-1]` (after the decoder's final layer norm), no dropout.
- PPOConfig: batch_size 4, mini_batch_size 2, ppo_epochs 2, learning_rate 1e-3, init_kl_coef 0.2, adap_kl_ctrl,
  target 6, horizon 10000, gamma 1, lam 0.95, cliprange 0.2, cliprange_value 0.2, vf_coef 0.1, ratio_threshold 10,
  no gradient clipping, no early stopping, kl_penalty "kl".
- Minibatches IN ORDER, no shuffling (TRL shuffles): in each epoch minibatch 0 = rows 0-1, minibatch 1 = rows 2-3.
  Adam steps 4 times: e0m0, e0m1, e1m0, e1m1. `optimizer.zero_grad()` before each minibatch.
- Adam: `torch.optim.Adam(lr=1e-3)` (betas 0.9/0.999, eps 1e-8, no weight decay, single-tensor CPU path) over the
  LoRA matrices in `model.parameters()` order, then `v_head.summary.weight`, `v_head.summary.bias`
  (`step.json` `adam.params_in_order`).
- Old log-probs and values: adapter ON; reference log-probs: inside peft's `disable_adapter()`; both no_grad, in
  chunks of mini_batch_size rows (0-1, 2-3), as TRL's `batched_forward_pass` does.

## Shapes and alignment

B = 4 rows, Lq = 14 (query width), W = 10 (response width), T = W - 1 = 9 (token slots), V = 320.

- `response_ids` ([B, W]) are TRL's `decoder_input_ids`: each row `[0, g1 .. gn]` (decoder start token 0, then the
  n = `generated_lengths[row]` generated tokens, EOS last when generated), right-padded with 0;
  `decoder_attention_mask` is 1 on those n + 1 tokens. Row 1 runs to the width without EOS.
- Slot s of every [B, T] tensor: the log-prob of `response_ids[:, s + 1]` (generated token g(s+1)) from the logits
  at decoder position s (`logits[:, :-1]` against `ids[:, 1:]`), and the value of the decoder state at position s.
- `masks`: TRL's seq2seq mask: 1 on slots 1 .. n - 1, i.e. every generated token except the FIRST (slot 0 is
  dropped: the first-token quirk), EOS included, padding excluded. It equals src/ppo/mask.rs
  `response_mask_from_lengths(generated_lengths, T, FirstToken::Drop)` (the script asserts this).
- Per-token tensors hold TRL's values in the masked-out slots too (e.g. the whitened advantages there are
  `(A - mean) / std` of whatever GAE left); only the slots where `masks` is 1 mean anything.

## step.safetensors (all F32; ids, lengths and masks are exact small integers)

| key | shape | |
|---|---|---|
| `query_ids`, `query_attention_mask` | [B, Lq] | encoder inputs, right-padded with 0, each query ends with EOS (1) |
| `query_lengths` | [B] | tokens per query, EOS included |
| `response_ids`, `decoder_attention_mask` | [B, W] | see above |
| `response_lengths` | [B] | n + 1 (TRL's response tensor length, start token included) |
| `generated_lengths` | [B] | n (generated tokens, EOS included) |
| `scores` | [B] | the scalar rewards |
| `old_logprobs`, `values`, `masks` | [B, T] | the rollout pass, adapter on |
| `ref_logprobs` | [B, T] | the reference pass, adapter off |
| `rewards`, `non_score_reward` | [B, T] | `compute_rewards`, kl_coef 0.2; score added at a row's last mask slot |
| `old_row0_logits`, `old_row0_log_softmax` | [3, V] | row 0, decoder positions 0..2, old pass (alignment debugging) |
| `ref_row0_log_softmax` | [3, V] | the same for the reference pass |
| `e{E}m{M}.logprobs`, `e{E}m{M}.vpreds` | [2, T] | epoch E, minibatch M: the forward with grad, before its Adam step |
| `e{E}m{M}.advantages` | [2, T] | GAE on the minibatch, then masked whitening (what the loss uses) |
| `e{E}m{M}.returns` | [2, T] | GAE advantages (before whitening) + masked old values |
| `e{E}m{M}.ratio` | [2, T] | `exp(logprobs - old_logprobs)`; exactly 1 for e0m0 |

## Other files

- `model/`: `config.json` + `model.safetensors` (the base model, never trained).
- `adapter/`: `adapter_config.json` + `adapter_model.safetensors` (peft's save_pretrained; keys like
  `base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight` [4, 64] / `...lora_B.weight` [64, 4])
  and `value_head.safetensors` (`v_head.summary.weight` [1, 64], `v_head.summary.bias` [1]): the state BEFORE the
  step.
- `grads/e{E}m{M}.safetensors`: the gradient of `pg_loss + vf_coef * vf_loss` for that minibatch, before its
  Adam step, keyed like the adapter and value-head files (24 LoRA matrices + 2 value-head tensors). `e0m0` is the
  first minibatch of the first epoch (all parameters still at the adapter's values).
- `params/after_e{E}m{M}.safetensors`: every trainable parameter after that minibatch's Adam step (same keys).
- `params_after.safetensors`: the parameters after the whole step (= `params/after_e1m1.safetensors`).

## step.json

- `ppo_config`, `minibatch_rows`, `shuffle` (false), `first_token` ("drop"), `lora`, `adam`, `shapes`,
  `query_lengths`, `response_lengths`, `generated_lengths`, `with_eos`, `mask_tokens_per_row`, `scores`, `versions`.
- `kl_coef_before` (0.2), `kl_coef_after`: the adaptive controller after `update(objective/kl, batch_size)`, done
  in float64 on the float32 `objective/kl` (NumPy 1.x arithmetic, as tools/ppo_reference.py's `seed_era_float`).
- `minibatches[i]` (i = 2 E + M): `epoch`, `minibatch`, `rows`, `skipped` (ratio-threshold skip), `pg_loss`,
  `vf_loss` (0.5 * masked mean of the clipped squared error, before vf_coef), `vf_term` (vf_coef * vf_loss, what
  TRL's `loss` returns), `total` (pg_loss + vf_coef * vf_loss), `loss_backward` (the tensor backward ran from),
  `stats` (TRL's per-minibatch stats as tools/ppo_reference.py `loss` reports them; `policy/ratio_mean` is the masked
  mean ratio that is thresholded, where TRL logs the ratio tensor).
- `step_stats`: tools/ppo_reference.py `record_step_stats` (TRL's `record_step_stats` without the token-length
  statistics): `objective/*` from the rollout, `ppo/*` the mean over the 4 minibatches' stats.
- `self_check`: the float64 finite-difference check the script asserts before writing.
"""


# --- writing ----------------------------------------------------------------------------------------------

def main():
    check_versions()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    gen = torch.Generator().manual_seed(SEED)

    built = build_and_save(gen)
    policy = load_policy(torch.float32)
    queries, responses, scores = make_rollout(policy, gen)
    assert [len(r) - 1 for r in responses] == GENERATED
    # The files mean the model that was built.
    with torch.no_grad():
        inputs = prepare_model_inputs(queries, responses)
        a = built(**inputs)
        b = policy(**inputs)
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]), "reloaded policy disagrees with the built one"
        o = policy.pretrained_model(**inputs, output_hidden_states=True)
        final = policy.pretrained_model.base_model.model.decoder(
            input_ids=inputs["decoder_input_ids"], attention_mask=inputs["decoder_attention_mask"],
            encoder_hidden_states=o.encoder_last_hidden_state, encoder_attention_mask=inputs["attention_mask"],
        ).last_hidden_state
        assert torch.equal(o.decoder_hidden_states[-1], final), "decoder_hidden_states[-1] is not the final-norm output"
    names = [n for n, _ in trainable(policy)]
    saved = load_file(os.path.join(OUT, "adapter", "adapter_model.safetensors"))
    assert sorted(n for n in names if "lora_" in n) == sorted(saved), "trainable LoRA names differ from the saved keys"
    assert names[-2:] == ["v_head.summary.weight", "v_head.summary.bias"]

    step = ppo_step(policy, queries, responses, scores)
    cols = step["masks"].shape[1]
    assert torch.equal(step["masks"], rust_style_mask(GENERATED, cols)), "mask differs from slots 1..n"
    # The first minibatch's forward is the old pass's computation again: ratio exactly 1, vpreds == values.
    first = step["minibatches"][0]["tensors"]
    assert torch.equal(first["ratio"], torch.ones_like(first["ratio"])), "first minibatch ratio != 1"
    assert torch.equal(first["vpreds"], step["values"][torch.tensor(MINIBATCH_ROWS[0])]), "first vpreds != values"
    fd = self_check(step, queries, responses, gen)

    mi = step["model_inputs"]
    t = {
        "query_ids": mi["input_ids"], "query_attention_mask": mi["attention_mask"],
        "query_lengths": torch.tensor(QUERY_LENGTHS), "response_ids": mi["decoder_input_ids"],
        "decoder_attention_mask": mi["decoder_attention_mask"],
        "response_lengths": torch.tensor([len(r) for r in responses]),
        "generated_lengths": torch.tensor(GENERATED), "scores": torch.stack(scores),
        "old_logprobs": step["old_logprobs"], "ref_logprobs": step["ref_logprobs"], "values": step["values"],
        "masks": step["masks"], "rewards": step["rewards"], "non_score_reward": step["non_score_reward"],
        "old_row0_logits": step["old_logits"][0, :3],
        "old_row0_log_softmax": torch.log_softmax(step["old_logits"][0, :3], dim=-1),
        "ref_row0_log_softmax": torch.log_softmax(step["ref_logits"][0, :3], dim=-1),
    }
    os.makedirs(os.path.join(OUT, "grads"))
    os.makedirs(os.path.join(OUT, "params"))
    minibatch_json = []
    for mb in step["minibatches"]:
        tag = f"e{mb['epoch']}m{mb['minibatch']}"
        for k, v in mb["tensors"].items():
            t[f"{tag}.{k}"] = v
        save_file({k: f32(v) for k, v in mb["grads"].items()}, os.path.join(OUT, "grads", f"{tag}.safetensors"),
                  metadata={"format": "pt"})
        save_file({k: f32(v) for k, v in mb["params_after"].items()},
                  os.path.join(OUT, "params", f"after_{tag}.safetensors"), metadata={"format": "pt"})
        minibatch_json.append({k: mb[k] for k in ["epoch", "minibatch", "rows", "skipped", "pg_loss", "vf_loss",
                                                  "vf_term", "total", "loss_backward", "stats"]})
    save_file({k: f32(v) for k, v in step["minibatches"][-1]["params_after"].items()},
              os.path.join(OUT, "params_after.safetensors"), metadata={"format": "pt"})
    save_file({k: f32(v) for k, v in t.items()}, os.path.join(OUT, "step.safetensors"), metadata={"format": "pt"})

    fixture = {
        "generator": "tools/make_ppo_step_fixture.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "numpy": np.__version__, "trl_transcribed": "0.4.7"},
        "ppo_config": vars(PPO),
        "minibatch_rows": MINIBATCH_ROWS,
        "shuffle": False,
        "first_token": "drop",
        "lora": {**LORA, "b_init_std": LORA_B_STD, "scaling": LORA["lora_alpha"] / LORA["r"]},
        "adam": {"params_in_order": [n for n, _ in trainable(policy)], "betas": [0.9, 0.999], "eps": 1e-8,
                 "weight_decay": 0.0, "steps": len(step["minibatches"])},
        "shapes": {"rows": len(responses), "query_width": int(mi["input_ids"].shape[1]),
                   "response_width": int(mi["decoder_input_ids"].shape[1]), "cols": cols,
                   "vocab": T5_KWARGS["vocab_size"]},
        "query_lengths": QUERY_LENGTHS,
        "response_lengths": [len(r) for r in responses],
        "generated_lengths": GENERATED,
        "with_eos": WITH_EOS,
        "mask_tokens_per_row": step["masks"].sum(dim=1).tolist(),
        "scores": SCORES,
        "kl_coef_before": step["kl_coef_before"],
        "kl_coef_after": step["kl_coef_after"],
        "minibatches": minibatch_json,
        "step_stats": step["step_stats"],
        "self_check": fd,
    }
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write(README)
    with open(os.path.join(OUT, "step.json"), "w") as f:
        json.dump(fixture, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"kl_coef {step['kl_coef_before']} -> {step['kl_coef_after']!r}; objective/kl "
          f"{step['step_stats']['objective/kl']:.6f}")
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {os.path.relpath(OUT)} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
