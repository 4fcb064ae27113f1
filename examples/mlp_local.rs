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

use anyhow::{Context, Result};
use ps_common::optim::Rule;
use ps_model::Mlp;
use ps_worker::data::{BatchBuf, Batches, Split, load_mnist};

ps_common::jemalloc!();

/// The one-process trainer (see the file's doc comment).
#[derive(clap::Parser)]
struct Args {
    #[arg(long, default_value_t = 1)]
    epochs: u64,
    /// Minibatch size.
    #[arg(long, default_value_t = 32, value_parser = positive)]
    batch: usize,
    /// Adam's learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The MNIST files (gzipped IDX).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist"))]
    data: PathBuf,
    /// Turn off the zero-skipping first layer, to compare.
    #[arg(long)]
    dense: bool,
}

fn positive(s: &str) -> Result<usize, String> {
    match s.parse() {
        Ok(0) => Err("must be positive".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{e}")),
    }
}

fn parse_args() -> Result<Args> {
    Ok(<Args as clap::Parser>::parse())
}

/// The servers' Adam (`ps_common::optim::Rule`, PyTorch semantics) applied
/// in-process, with its state and step count.
struct Adam {
    rule: Rule,
    state: Vec<f32>,
    step: u64,
}

impl Adam {
    fn new(lr: f32, params: &[f32]) -> Self {
        let rule = Rule::adam(lr);
        let mut state = vec![0.0; params.len() * rule.state_per_param()];
        rule.init_state(params, &mut state);
        Self { rule, state, step: 0 }
    }

    fn step(&mut self, params: &mut [f32], grads: &[f32]) {
        self.step += 1;
        self.rule.apply(self.step, 1.0, params, grads, &mut self.state);
    }
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
    let mut adam = Adam::new(args.lr, &params);
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
