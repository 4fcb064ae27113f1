//! Dynamic batching: requests that arrive close together run as one forward
//! pass.
//!
//! One batcher task per model takes requests from a bounded queue. It starts
//! a batch with the oldest request, adds every request already queued, then
//! waits for more until the batch holds `max_batch` examples or `max_delay`
//! has passed since it started; then it runs the batch. A batch holds
//! requests for one model version: each request carries the version it was
//! resolved to, and requests for different versions (around a hot swap) run
//! as separate batches. Requests are checked before they are queued, so a
//! batch never fails because of one bad request.
//!
//! A full queue refuses at once ([`Error::Overloaded`]) rather than grow.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::model::Inputs;
use crate::slot::Loaded;

/// How requests are batched.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Examples per batch (a larger single request runs alone).
    pub max_batch: usize,
    /// How long a batch waits for more requests after its first one. Zero
    /// batches only what is already queued. Below a millisecond the wait is
    /// a loop of task yields (tokio's timers tick in milliseconds).
    pub max_delay: Duration,
    /// Requests that may wait in the queue.
    pub queue: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig { max_batch: 64, max_delay: Duration::ZERO, queue: 4096 }
    }
}

struct Job {
    model: Arc<Loaded>,
    inputs: Inputs,
    reply: oneshot::Sender<Result<Vec<f32>>>,
}

/// The queue of one model's batcher task.
#[derive(Clone)]
pub struct Batcher {
    name: String,
    tx: mpsc::Sender<Job>,
}

impl Batcher {
    /// Starts the batcher task of model `name`.
    pub fn spawn(name: &str, config: BatchConfig) -> Batcher {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        tokio::spawn(run(rx, config));
        Batcher { name: name.to_string(), tx }
    }

    /// Predicts `inputs` (checked) with `model`, in a batch with others.
    pub async fn predict(&self, model: Arc<Loaded>, inputs: Inputs) -> Result<Vec<f32>> {
        let (reply, answer) = oneshot::channel();
        self.tx.try_send(Job { model, inputs, reply }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::Overloaded(self.name.clone()),
            mpsc::error::TrySendError::Closed(_) => Error::Stopped,
        })?;
        answer.await.map_err(|_| Error::Stopped)?
    }
}

async fn run(mut rx: mpsc::Receiver<Job>, config: BatchConfig) {
    while let Some(first) = rx.recv().await {
        let deadline = Instant::now() + config.max_delay;
        let mut rows = first.inputs.rows();
        let mut jobs = vec![first];
        while rows < config.max_batch {
            let job = match rx.try_recv() {
                Ok(job) => job,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    if deadline - now < Duration::from_millis(1) {
                        tokio::task::yield_now().await;
                        continue;
                    }
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(job)) => job,
                        Ok(None) | Err(_) => break,
                    }
                }
            };
            rows += job.inputs.rows();
            jobs.push(job);
        }
        run_batch(jobs);
    }
}

/// Runs `jobs`, one forward pass per run of consecutive jobs on the same
/// model version, and answers each.
fn run_batch(mut jobs: Vec<Job>) {
    while !jobs.is_empty() {
        let n = jobs.iter().take_while(|j| Arc::ptr_eq(&j.model, &jobs[0].model)).count();
        let rest = jobs.split_off(n);
        predict_group(jobs);
        jobs = rest;
    }
}

fn predict_group(jobs: Vec<Job>) {
    let model = Arc::clone(&jobs[0].model);
    let width = model.model.output_width();
    let mut rows = Vec::with_capacity(jobs.len());
    let mut replies = Vec::with_capacity(jobs.len());
    let mut batch: Option<Inputs> = None;
    for job in jobs {
        rows.push(job.inputs.rows());
        replies.push(job.reply);
        match &mut batch {
            None => batch = Some(job.inputs),
            Some(b) => b.append(job.inputs),
        }
    }
    let Some(batch) = batch else { return };
    let mut out = Vec::new();
    match model.model.predict(&batch, &mut out) {
        Ok(()) => {
            let mut at = 0;
            for (reply, n) in replies.into_iter().zip(rows) {
                let _ = reply.send(Ok(out[at..at + n * width].to_vec()));
                at += n * width;
            }
        }
        Err(e) => {
            // Every request was checked alone; a batch of checked requests
            // that fails is a bug, reported to each caller.
            let msg = e.to_string();
            for reply in replies {
                let _ = reply.send(Err(Error::bad(format!("batch failed: {msg}"))));
            }
        }
    }
}
