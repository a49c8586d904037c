//! The whole backward pass — value head, LM head, every decoder and encoder layer, down to each
//! LoRA matrix — against central finite differences of the forward on a tiny T5, with the adapters'
//! and the value head's dropout on (their masks are fixed by the seed, so the function is smooth).

mod common;

use common::fixture;
use detox::backend::cpu::Cpu;
use detox::ppo::policy::{Policy, PolicyGrads, Responses};
use detox::ppo::trainables::trainables;
use detox::t5::model::Fwd;
use detox::t5::{Prompts, T5, ValueHead};
use detox::text::pad_batch;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn policy() -> Policy<Cpu> {
    let dir = fixture("t5/flan_small");
    let mut model = T5::load(&Cpu, &dir).unwrap();
    model.load_adapter(&Cpu, &dir.join("adapter")).unwrap();
    let value_head = ValueHead::load(&Cpu, &dir.join("adapter/value_head.safetensors"), model.config.d_model).unwrap();
    Policy { model, value_head, value_dropout: 0.1 }
}

/// Every trainable value, in the optimiser's order, as mutable slices.
fn params(p: &mut Policy<Cpu>) -> Vec<&mut Vec<f32>> {
    trainables(p).into_iter().map(|t| &mut t.param.data).collect()
}

#[test]
fn policy_gradients_match_finite_differences() {
    let mut pol = policy();
    let be = Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let prompts: Vec<Vec<u32>> = [9usize, 14]
        .iter()
        .map(|&n| (0..n).map(|i| if i + 1 == n { 1 } else { rng.random_range(3..320) }).collect())
        .collect();
    let prompts = Prompts::upload(&be, &pad_batch(&prompts, 0), &[0, 1]).unwrap();
    let responses: Vec<Vec<u32>> = vec![vec![17, 250, 33, 1], vec![5, 6, 7, 8, 9, 10]];
    let responses = Responses::upload(&be, &responses, 6, 0, 0).unwrap();
    let n = 12;
    let r: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let s: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let f = Fwd::train(77);
    let objective = |p: &Policy<Cpu>| -> f64 {
        let sc = p.score(&be, &prompts, &responses, f, true).unwrap();
        sc.logprobs.iter().zip(&r).map(|(a, b)| (*a * *b) as f64).sum::<f64>()
            + sc.values.iter().zip(&s).map(|(a, b)| (*a * *b) as f64).sum::<f64>()
    };

    let scored = pol.score(&be, &prompts, &responses, f, true).unwrap();
    let mut grads = PolicyGrads::zeros(&be, &pol).unwrap();
    pol.backward(&be, &prompts, &responses, scored, &r, &s, 1.0, &mut grads).unwrap();
    let mut grad_flat: Vec<f32> = Vec::new();
    for g in grads.tensors() {
        grad_flat.extend(&g.data);
    }
    assert!(grad_flat.iter().any(|g| *g != 0.0));

    // Every parameter group alone, then all at once: a wrong gradient in any layer shows up.
    let groups = params(&mut pol).len();
    for group in (0..groups).chain([usize::MAX]) {
        let mut offset = 0;
        let mut dirs: Vec<Vec<f32>> = Vec::new();
        let mut analytic = 0.0f64;
        for (i, p) in params(&mut pol).into_iter().enumerate() {
            let u: Vec<f32> = if group == usize::MAX || group == i {
                (0..p.len()).map(|_| rng.random_range(-1.0..1.0)).collect()
            } else {
                vec![0.0; p.len()]
            };
            analytic += u.iter().zip(&grad_flat[offset..offset + p.len()]).map(|(a, b)| (*a * *b) as f64).sum::<f64>();
            offset += p.len();
            dirs.push(u);
        }
        let mut derivative = |eps: f32| -> f64 {
            let mut shifted = |sign: f32| -> f64 {
                for (p, u) in params(&mut pol).into_iter().zip(&dirs) {
                    p.iter_mut().zip(u).for_each(|(x, d)| *x += sign * eps * d);
                }
                let v = objective(&pol);
                for (p, u) in params(&mut pol).into_iter().zip(&dirs) {
                    p.iter_mut().zip(u).for_each(|(x, d)| *x -= sign * eps * d);
                }
                v
            };
            (shifted(1.0) - shifted(-1.0)) / (2.0 * eps as f64)
        };
        // Richardson's extrapolation of two central differences cancels their ε² error, which the
        // softmaxes' curvature makes large at any step f32 can resolve.
        let numeric = (4.0 * derivative(5e-4) - derivative(1e-3)) / 3.0;
        // f32 evaluations leave ~0.02 of noise in a derivative; judge small ones against that.
        let err = (numeric - analytic).abs() / numeric.abs().max(analytic.abs()).max(10.0);
        assert!(err < 5e-3, "group {group}: analytic {analytic} vs finite differences {numeric} ({err})");
    }
}
