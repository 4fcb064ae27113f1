//! Trains the reference MNIST model (784-64-64-10, ReLU, softmax) in one process with
//! Adam, and reports throughput: a baseline for the distributed runs.
//!
//! ```text
//! cargo run --release --example mlp_local -- [--epochs 1] [--batch 32] [--lr 1e-3] [--seed 0] [--data data/mnist] [--dense]
//! ```
//!
//! Per epoch it prints samples/s of the gradient computation alone and of the full
//! step (gather the batch, gradient, Adam update), the time split between the phases,
//! and the test accuracy. `--dense` turns off the zero-skipping first layer, to compare.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ps_worker::data::{BatchBuf, Batches, Split, load_mnist};
use ps_worker::model::Mlp;

struct Args {
    epochs: u64,
    batch: usize,
    lr: f32,
    seed: u64,
    data: PathBuf,
    dense: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        epochs: 1,
        batch: 32,
        lr: 1e-3,
        seed: 0,
        data: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/mnist"),
        dense: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--epochs" => args.epochs = value()?.parse().context("--epochs")?,
            "--batch" => args.batch = value()?.parse().context("--batch")?,
            "--lr" => args.lr = value()?.parse().context("--lr")?,
            "--seed" => args.seed = value()?.parse().context("--seed")?,
            "--data" => args.data = value()?.into(),
            "--dense" => args.dense = true,
            "-h" | "--help" => {
                println!(
                    "usage: mlp_local [--epochs N] [--batch N] [--lr F] [--seed N] [--data DIR] [--dense]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    if args.batch == 0 {
        bail!("--batch must be positive");
    }
    Ok(args)
}

/// Adam (Kingma & Ba, 2015) with Keras' defaults and its bias-correction form:
/// `p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)`.
struct Adam {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    m: Vec<f32>,
    v: Vec<f32>,
    t: i32,
}

impl Adam {
    fn new(lr: f32, len: usize) -> Self {
        Self { lr, beta1: 0.9, beta2: 0.999, eps: 1e-7, m: vec![0.0; len], v: vec![0.0; len], t: 0 }
    }

    fn step(&mut self, params: &mut [f32], grads: &[f32]) {
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let alpha = self.lr * (1.0 - b2.powi(self.t)).sqrt() / (1.0 - b1.powi(self.t));
        let (m, v) = (&mut self.m[..], &mut self.v[..]);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, as just checked.
            return unsafe { adam_update_avx2(params, grads, m, v, alpha, b1, b2, self.eps) };
        }
        adam_update(params, grads, m, v, alpha, b1, b2, self.eps);
    }
}

/// The element-wise Adam update; inlined into an AVX2 build so it runs 8 lanes wide.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn adam_update(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    alpha: f32,
    b1: f32,
    b2: f32,
    eps: f32,
) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m).zip(v) {
        *m = b1 * *m + (1.0 - b1) * g;
        *v = b2 * *v + (1.0 - b2) * g * g;
        *p -= alpha * *m / (v.sqrt() + eps);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
fn adam_update_avx2(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    alpha: f32,
    b1: f32,
    b2: f32,
    eps: f32,
) {
    adam_update(p, g, m, v, alpha, b1, b2, eps)
}

fn rate(samples: usize, time: Duration) -> f64 {
    samples as f64 / time.as_secs_f64()
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let t = Instant::now();
    let train = load_mnist(&args.data, Split::Train).context("loading the MNIST training set")?;
    let test = load_mnist(&args.data, Split::Test).context("loading the MNIST test set")?;
    println!("loaded {} train / {} test rows in {:.2?}", train.len(), test.len(), t.elapsed());

    let mut mlp = Mlp::new(&[784, 64, 64, 10]);
    if args.dense {
        mlp = mlp.with_sparse_input(0.0);
    }
    let mut params = mlp.init_params(args.seed);
    let mut grads = vec![0.0; mlp.num_params()];
    let mut ws = mlp.workspace(args.batch);
    let mut adam = Adam::new(args.lr, mlp.num_params());
    let mut batches = Batches::new(train.len(), args.batch, args.seed);
    let mut buf = BatchBuf::new();
    println!(
        "model 784-64-64-10: {} parameters; Adam lr {}, batch {}; first layer {}",
        mlp.num_params(),
        args.lr,
        args.batch,
        if args.dense { "dense" } else { "zero-skipping when the batch is sparse" },
    );

    for epoch in 0..args.epochs {
        let (mut gather, mut grad, mut update) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        let (mut loss_sum, mut correct, mut samples) = (0.0f64, 0usize, 0usize);
        let start = Instant::now();
        for rows in batches.epoch(epoch) {
            let t0 = Instant::now();
            train.gather(rows, &mut buf);
            let t1 = Instant::now();
            let (loss, hits) = mlp.loss_and_grad(&params, buf.x(), buf.y(), &mut grads, &mut ws);
            let t2 = Instant::now();
            adam.step(&mut params, &grads);
            let t3 = Instant::now();
            (gather, grad, update) = (gather + (t1 - t0), grad + (t2 - t1), update + (t3 - t2));
            loss_sum += f64::from(loss) * rows.len() as f64;
            correct += hits;
            samples += rows.len();
        }
        let wall = start.elapsed();
        let (test_loss, test_acc) = mlp.evaluate(&params, test.x.view(), &test.y);
        println!(
            "epoch {}: train loss {:.4} acc {:.4} | test loss {:.4} acc {:.4} | {:.0} samples/s gradient, \
             {:.0} samples/s full step | gather {:.2?} gradient {:.2?} adam {:.2?} of {:.2?}",
            epoch + 1,
            loss_sum / samples as f64,
            correct as f64 / samples as f64,
            test_loss,
            test_acc,
            rate(samples, grad),
            rate(samples, wall),
            gather,
            grad,
            update,
            wall,
        );
    }
    Ok(())
}
