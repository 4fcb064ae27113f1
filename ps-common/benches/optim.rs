//! Apply rate of each optimizer rule over one 64k-float block (a dense
//! chunk of the default length), as a shard applies it under the block lock.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ps_common::optim::Rule;

const N: usize = 1 << 16;

fn rules() -> [(&'static str, Rule); 6] {
    [
        ("sgd", Rule::sgd(0.01)),
        (
            "momentum",
            Rule::Momentum { lr: 0.01, momentum: 0.9, dampening: 0.0, nesterov: false, weight_decay: 0.0 },
        ),
        ("adagrad", Rule::Adagrad { lr: 0.01, eps: 1e-10, initial_accumulator: 0.0, weight_decay: 0.0 }),
        ("adam", Rule::adam(1e-3)),
        (
            "adamw",
            Rule::Adam { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, decoupled: true },
        ),
        ("ftrl", Rule::Ftrl { alpha: 0.1, beta: 1.0, l1: 0.01, l2: 0.01 }),
    ]
}

fn apply(c: &mut Criterion) {
    let grad: Vec<f32> = (0..N).map(|i| ((i % 97) as f32 - 48.0) * 1e-3).collect();
    let mut group = c.benchmark_group("optim/apply_64k");
    group.throughput(Throughput::Elements(N as u64));
    for (name, rule) in rules() {
        let mut params = vec![0.1f32; N];
        let mut state = vec![0.0f32; N * rule.state_per_param()];
        rule.init_state(&params, &mut state);
        let mut step = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                step += 1;
                rule.apply(step, 1.0, &mut params, black_box(&grad), &mut state);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, apply);
criterion_main!(benches);
