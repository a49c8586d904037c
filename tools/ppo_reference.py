#!/usr/bin/env python3
"""Writes tests/fixtures/ppo/step.json: one TRL 0.4.7 PPO step's arithmetic on fixed random inputs, as
PyTorch computes it, for tests/ppo_math.rs to compare src/ppo against.

The functions below transcribe TRL 0.4.7 (`trl/core.py`, `trl/trainer/ppo_trainer.py`,
`trl/trainer/utils.py`) for a seq2seq policy with a value head; the models are replaced by random
logits and values, and the trainer's plumbing (accelerate, datasets, the dataloader's shuffling) by
fixed minibatches. What is kept is every tensor operation between the forward passes and the
optimiser, in TRL's order and dtypes:
  - the response mask `batched_forward_pass` builds from the decoder inputs (dropping the first
    generated token);
  - `compute_rewards`, then `loss` on each minibatch (GAE, whitening, clipped losses, statistics), with
    autograd's gradients with respect to the new log-probs, the new values and the logits;
  - `record_step_stats` and the adaptive KL controller's update;
  - `torch.optim.Adam` steps and `torch.nn.utils.clip_grad_norm_`.

Run from the repository root with the oracle's Python (tools/requirements-oracle.txt):
    /opt/oracle/bin/python tools/ppo_reference.py
"""
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

PINNED = {"torch": "2.11.0"}
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "ppo", "step.json")
EOS, PAD = 1, 0


def check_versions():
    for mod, want in PINNED.items():
        have = sys.modules[mod].__version__.split("+")[0]
        if have != want:
            print(f"warning: {mod} {have} is not the pinned {want}; fixtures may differ", file=sys.stderr)


# --- trl/core.py (0.4.7) ---------------------------------------------------------------------------

def logprobs_from_logits(logits, labels):
    logp = F.log_softmax(logits, dim=2)
    return torch.gather(logp, 2, labels.unsqueeze(2)).squeeze(-1)


def masked_mean(values, mask, axis=None):
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    return (values * mask).sum() / mask.sum()


def masked_var(values, mask, unbiased=True):
    mean = masked_mean(values, mask)
    centered_values = values - mean
    variance = masked_mean(centered_values**2, mask)
    if unbiased:
        bessel_correction = mask.sum() / (mask.sum() - 1)
        variance = variance * bessel_correction
    return variance


def masked_whiten(values, mask, shift_mean=True):
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def clip_by_value(x, tensor_min, tensor_max):
    return torch.max(torch.min(x, tensor_max), tensor_min)


def entropy_from_logits(logits):
    pd = torch.nn.functional.softmax(logits, dim=-1)
    return torch.logsumexp(logits, axis=-1) - torch.sum(pd * logits, axis=-1)


# --- trl/trainer/utils.py (0.4.7) ------------------------------------------------------------------

class AdaptiveKLController:
    def __init__(self, init_kl_coef, target, horizon):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current, n_steps):
        proportional_error = np.clip(current / self.target - 1, -0.2, 0.2)
        mult = 1 + proportional_error * n_steps / self.horizon
        self.value *= mult


# --- trl/trainer/ppo_trainer.py (0.4.7) ------------------------------------------------------------

def seq2seq_masks(decoder_attention_mask):
    """The mask half of `batched_forward_pass` for an encoder-decoder model."""
    attention_mask = decoder_attention_mask
    masks = torch.zeros_like(attention_mask)
    masks[:, :-1] = attention_mask[:, 1:]
    for j in range(attention_mask.shape[0]):
        start = 1
        end = attention_mask[j, :].sum() - 1
        masks[j, :start] = 0
        masks[j, end:] = 0
    return masks[:, :-1]


def compute_rewards(config, kl_coef, scores, logprobs, ref_logprobs, masks):
    rewards, non_score_rewards = [], []
    for score, logprob, ref_logprob, mask in zip(scores, logprobs, ref_logprobs, masks):
        kl = logprob - ref_logprob  # kl_penalty == "kl"
        non_score_reward = -kl_coef * kl
        non_score_rewards.append(non_score_reward)
        reward = non_score_reward.clone()
        last_non_masked_index = mask.nonzero()[-1]
        reward[last_non_masked_index] += score
        rewards.append(reward)
    return torch.stack(rewards), torch.stack(non_score_rewards)


def loss(config, old_logprobs, values, rewards, logits, vpreds, logprobs, mask):
    """`PPOTrainer.loss`, also handing back the advantages and returns it computes on the way."""
    lastgaelam = 0
    advantages_reversed = []
    gen_len = rewards.shape[-1]

    values = values * mask
    rewards = rewards * mask

    for t in reversed(range(gen_len)):
        nextvalues = values[:, t + 1] if t < gen_len - 1 else 0.0
        delta = rewards[:, t] + config.gamma * nextvalues - values[:, t]
        lastgaelam = delta + config.gamma * config.lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1]).transpose(0, 1)

    returns = advantages + values
    advantages = masked_whiten(advantages, mask)
    advantages = advantages.detach()

    vpredclipped = clip_by_value(vpreds, values - config.cliprange_value, values + config.cliprange_value)

    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    vf_clipfrac = masked_mean(torch.gt(vf_losses2, vf_losses1).float(), mask)

    ratio = torch.exp(logprobs - old_logprobs)

    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - config.cliprange, 1.0 + config.cliprange)

    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    pg_clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses).float(), mask)

    total = pg_loss + config.vf_coef * vf_loss

    avg_ratio = masked_mean(ratio, mask).item()
    skipped = avg_ratio > config.ratio_threshold
    if skipped:
        pg_loss = pg_loss * 0.0
        vf_loss = vf_loss * 0.0
        total = total * 0.0

    entropy = masked_mean(entropy_from_logits(logits), mask)

    approxkl = 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask)
    policykl = masked_mean(old_logprobs - logprobs, mask)

    return_mean, return_var = masked_mean(returns, mask), masked_var(returns, mask)
    value_mean, value_var = masked_mean(values, mask), masked_var(values, mask)

    stats = {
        "loss/policy": pg_loss.item(),
        "loss/value": vf_loss.item(),
        "loss/total": total.item(),
        "policy/entropy": entropy.item(),
        "policy/approxkl": approxkl.item(),
        "policy/policykl": policykl.item(),
        "policy/clipfrac": pg_clipfrac.item(),
        "policy/advantages_mean": masked_mean(advantages, mask).item(),
        "policy/ratio_mean": avg_ratio,  # TRL logs the ratio tensor; its masked mean is what is thresholded
        "returns/mean": return_mean.item(),
        "returns/var": return_var.item(),
        "val/vpred": masked_mean(vpreds, mask).item(),
        "val/error": masked_mean((vpreds - returns) ** 2, mask).item(),
        "val/clipfrac": vf_clipfrac.item(),
        "val/mean": value_mean.item(),
        "val/var": value_var.item(),
    }
    return pg_loss, config.vf_coef * vf_loss, stats, advantages, returns, skipped


def record_step_stats(kl_coef, scores, logprobs, ref_logprobs, non_score_reward, masks, train_stats):
    """The arithmetic of `record_step_stats` (the token-length statistics left out)."""
    kl_list = ((logprobs - ref_logprobs) * masks).sum(axis=-1)
    mean_kl = kl_list.mean()
    mean_entropy = (-logprobs * masks).sum(axis=-1).mean()
    mean_non_score_reward = masked_mean(non_score_reward, masks)
    mean_scores = torch.stack(scores).mean()
    std_scores = torch.stack(scores).std()
    stats = {
        "objective/kl": mean_kl.item(),
        "objective/kl_dist": kl_list.tolist(),
        "objective/kl_coef": kl_coef,
        "objective/entropy": mean_entropy.item(),
        "ppo/mean_non_score_reward": mean_non_score_reward.item(),
        "ppo/mean_scores": mean_scores.item(),
        "ppo/std_scores": std_scores.item(),
    }
    for k in train_stats[0]:
        stats[f"ppo/{k}"] = torch.mean(torch.tensor([[s[k]] for s in train_stats]), axis=0).item()
    stats["ppo/val/var_explained"] = 1 - stats["ppo/val/error"] / stats["ppo/returns/var"]
    return stats


# --- the fixture -----------------------------------------------------------------------------------

def flat(t):
    return [float(x) for x in t.detach().to(torch.float32).reshape(-1).tolist()]


def make_step(gen, config):
    vocab = 13
    # Generated token counts; rows 0 and 4 stop at max_new_tokens without EOS, the rest end with EOS.
    lengths = [9, 5, 2, 7, 9, 4, 3, 8]
    with_eos = [False, True, True, True, False, True, True, True]
    rows, cols = len(lengths), max(lengths)
    responses = []
    for n, eos in zip(lengths, with_eos):
        r = torch.randint(2, vocab, (n,), generator=gen)
        if eos:
            r[-1] = EOS
        responses.append(r)
    # `prepare_model_inputs` pads the decoder inputs [pad, g1 .. gn] on the right with pad.
    width = cols + 1
    decoder_input_ids = torch.full((rows, width), PAD, dtype=torch.long)
    decoder_attention_mask = torch.zeros(rows, width, dtype=torch.long)
    for j, r in enumerate(responses):
        decoder_input_ids[j, 1 : 1 + len(r)] = r
        decoder_attention_mask[j, : 1 + len(r)] = 1
    masks = seq2seq_masks(decoder_attention_mask)
    labels = decoder_input_ids[:, 1:]

    rollout_logits = 2.0 * torch.randn(rows, width, vocab, generator=gen)
    ref_logits = rollout_logits + 0.4 * torch.randn(rows, width, vocab, generator=gen)
    all_logprobs = logprobs_from_logits(rollout_logits[:, :-1], labels)
    ref_logprobs = logprobs_from_logits(ref_logits[:, :-1], labels)
    values = torch.randn(rows, width, generator=gen)[:, :-1].contiguous()
    scores = [s for s in torch.randn(rows, generator=gen)]

    rewards, non_score_reward = compute_rewards(config, config.init_kl_coef, scores, all_logprobs, ref_logprobs,
                                                masks)

    minibatches = []
    train_stats = []
    for mb_rows in ([3, 0, 5, 1], [2, 7, 4, 6]):
        idx = torch.tensor(mb_rows)
        new_logits = rollout_logits[idx, :-1] + 0.5 * torch.randn(len(mb_rows), cols, vocab, generator=gen)
        vpreds = values[idx] + 0.3 * torch.randn(len(mb_rows), cols, generator=gen)
        if mb_rows[0] == 3:
            # Ties: an unchanged policy row (ratio exactly 1), an unchanged value row, and new values
            # sitting exactly on the value clip's bounds.
            new_logits[2] = rollout_logits[5, :-1]
            vpreds[0] = values[3]
            vpreds[1, 1:4] = (values[0] + config.cliprange_value)[1:4]
            vpreds[1, 4:6] = (values[0] - config.cliprange_value)[4:6]
        new_logits.requires_grad_(True)
        vpreds.requires_grad_(True)
        logprobs = logprobs_from_logits(new_logits, labels[idx])
        logprobs.retain_grad()
        loss_p, loss_v, stats, advantages, returns, skipped = loss(
            config, all_logprobs[idx], values[idx], rewards[idx], new_logits, vpreds, logprobs, masks[idx])
        (loss_p + loss_v).backward()
        train_stats.append(stats)
        minibatches.append({
            "rows": mb_rows,
            "logits": flat(new_logits),
            "logprobs": flat(logprobs),
            "vpreds": flat(vpreds),
            "advantages": flat(advantages),
            "returns": flat(returns),
            "skipped": skipped,
            "stats": stats,
            "d_logprobs": flat(logprobs.grad),
            "d_vpreds": flat(vpreds.grad),
            "d_logits": flat(new_logits.grad),
        })
        tokens = int(masks[idx].sum())
        print(f"minibatch {mb_rows}: {tokens} tokens, clipfrac {stats['policy/clipfrac']:.3f}, "
              f"val clipfrac {stats['val/clipfrac']:.3f}, loss {stats['loss/total']:.5f}")

    step_stats = record_step_stats(config.init_kl_coef, scores, all_logprobs, ref_logprobs, non_score_reward, masks,
                                   train_stats)
    kl_ctl = AdaptiveKLController(config.init_kl_coef, config.target, config.horizon)
    kl_ctl.update(seed_era_float(step_stats["objective/kl"]), config.batch_size)

    return {
        "rows": rows,
        "cols": cols,
        "vocab": vocab,
        "responses": [r.tolist() for r in responses],
        "mask": flat(masks),
        "labels": labels.reshape(-1).tolist(),
        "rollout_logits": flat(rollout_logits[:, :-1]),
        "logprobs": flat(all_logprobs),
        "ref_logprobs": flat(ref_logprobs),
        "values": flat(values),
        "scores": [float(s) for s in scores],
        "rewards": flat(rewards),
        "non_score_reward": flat(non_score_reward),
        "minibatches": minibatches,
        "step_stats": step_stats,
        "kl_coef_after": float(kl_ctl.value),
    }


def seed_era_float(kl):
    """TRL hands the controller `objective/kl` as a 0-d float32 NumPy array. NumPy 1.x (the seed's) then
    does the update in float64; NumPy 2 (NEP 50) would keep float32 and turn the coefficient into a
    float32. A Python float of the same value gives the seed's float64 arithmetic under either."""
    return float(np.float32(kl))


def make_kl_sequence(config):
    """The adaptive controller over several steps: KL far above and below target (clipped at ±0.2)
    and near it."""
    kl_ctl = AdaptiveKLController(config.init_kl_coef, config.target, config.horizon)
    updates = [[50.0, 16], [0.3, 16], [6.6, 16], [-2.0, 256], [5.0, 1]]
    out = []
    for current, n_steps in updates:
        kl_ctl.update(seed_era_float(current), n_steps)
        out.append(float(kl_ctl.value))
    return {"updates": updates, "values": out}


def make_adam(gen):
    shapes = [[4, 3], [7], [2, 5]]
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]
    init = [flat(p) for p in params]
    opt = torch.optim.Adam(params, lr=1e-3)
    steps = []
    # The second step's zero gradients are what a minibatch skipped by ratio_threshold hands Adam.
    for scale in (1.0, 0.0, 10.0):
        grads = [scale * torch.randn(*s, generator=gen) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        steps.append({
            "grads": [flat(g) for g in grads],
            "params": [flat(p) for p in params],
            "exp_avg": [flat(opt.state[p]["exp_avg"]) for p in params],
            "exp_avg_sq": [flat(opt.state[p]["exp_avg_sq"]) for p in params],
        })
    return {"lr": 1e-3, "shapes": shapes, "init": init, "steps": steps}


def make_clip(gen):
    shapes = [[4, 3], [7], [2, 5]]
    grads = [torch.randn(*s, generator=gen) for s in shapes]
    cases = []
    for max_norm in (1.0, 100.0):
        params = [torch.nn.Parameter(torch.zeros(*s)) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        total = torch.nn.utils.clip_grad_norm_(params, max_norm)
        cases.append({"max_norm": max_norm, "total_norm": float(total), "clipped": [flat(p.grad) for p in params]})
    return {"shapes": shapes, "grads": [flat(g) for g in grads], "cases": cases}


def main():
    check_versions()
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(20230601)
    config = SimpleNamespace(init_kl_coef=0.2, target=6.0, horizon=10000.0, gamma=1.0, lam=0.95, cliprange=0.2,
                             cliprange_value=0.2, vf_coef=0.1, ratio_threshold=10.0, batch_size=8)
    fixture = {
        "generator": "tools/ppo_reference.py",
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "trl_transcribed": "0.4.7"},
        "config": vars(config),
        "step": make_step(gen, config),
        "kl_sequence": make_kl_sequence(config),
        "adam": make_adam(gen),
        "clip_grad_norm": make_clip(gen),
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(fixture, f, separators=(",", ":"))
    print(f"wrote {os.path.relpath(OUT)} (torch {torch.__version__}, numpy {np.__version__})")


if __name__ == "__main__":
    main()
