//! Dynamic batching: requests that arrive close together run as one forward
//! pass.
//!
//! The batcher has no task of its own; the requests take turns leading
//! (flat combining, as group commit in databases). A request that finds no
//! batch running leads one: it waits up to `max_delay` for company, takes
//! the requests queued meanwhile (up to `max_batch` examples), runs them
//! with its own as one forward pass, and answers each. Requests that arrive
//! while a batch runs queue; when the batch ends, the leader hands the lead
//! to the oldest of them, which runs everything queued by then. So a lone
//! request runs at once on its own task (no hand-off between threads), and
//! under load the batch grows by itself to what arrived during the last one.
//!
//! A batch holds the requests of one model version at a time: each request
//! carries the version it was resolved to, and requests for different
//! versions (around a hot swap) run as separate passes. Requests are checked
//! before they queue, so a batch never fails because of one bad request. A
//! full queue refuses at once ([`Error::Overloaded`]) rather than grow. A
//! request cancelled while it leads (its client went away) still hands the
//! lead on.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::model::Inputs;
use crate::slot::Loaded;

/// How requests are batched.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Examples per batch (a larger single request runs alone).
    pub max_batch: usize,
    /// How long a batch's leader waits for company. Zero batches only what
    /// queued while the previous batch ran. Below a millisecond the wait is
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
    reply: oneshot::Sender<Outcome>,
}

enum Outcome {
    /// The outputs of the job (or why there are none).
    Done(Result<Vec<f32>>),
    /// The job's inputs, back: it leads the next batch.
    Lead(Arc<Loaded>, Inputs),
}

#[derive(Default)]
struct State {
    /// A batch is running (or its leader is gathering it).
    leading: bool,
    queue: VecDeque<Job>,
    queued_rows: usize,
}

/// The batcher of one model.
pub struct Batcher {
    name: String,
    config: BatchConfig,
    state: Mutex<State>,
    /// Forward passes run, and the examples they held.
    batches: AtomicU64,
    examples: AtomicU64,
}

impl Batcher {
    pub fn new(name: &str, config: BatchConfig) -> Batcher {
        Batcher {
            name: name.to_string(),
            config,
            state: Mutex::default(),
            batches: AtomicU64::new(0),
            examples: AtomicU64::new(0),
        }
    }

    /// (forward passes run, examples they held) so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.batches.load(Ordering::Relaxed), self.examples.load(Ordering::Relaxed))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Predicts `inputs` (checked) with `model`, in a batch with others.
    pub async fn predict(&self, model: Arc<Loaded>, inputs: Inputs) -> Result<Vec<f32>> {
        // The lock is released before any wait.
        let queued = {
            let mut st = self.lock();
            if st.leading {
                if st.queue.len() >= self.config.queue {
                    return Err(Error::Overloaded(self.name.clone()));
                }
                let (reply, answer) = oneshot::channel();
                st.queued_rows += inputs.rows();
                st.queue.push_back(Job { model, inputs, reply });
                Err(answer)
            } else {
                st.leading = true;
                Ok((model, inputs))
            }
        };
        match queued {
            Ok((model, inputs)) => self.lead(model, inputs).await,
            Err(answer) => match answer.await {
                Ok(Outcome::Done(r)) => r,
                Ok(Outcome::Lead(model, inputs)) => self.lead(model, inputs).await,
                Err(_) => Err(Error::Stopped),
            },
        }
    }

    /// Runs a batch led by this request, then hands the lead on.
    async fn lead(&self, model: Arc<Loaded>, inputs: Inputs) -> Result<Vec<f32>> {
        let _handover = Handover(self);
        let own_rows = inputs.rows();
        if !self.config.max_delay.is_zero() {
            let deadline = Instant::now() + self.config.max_delay;
            loop {
                let queued = self.lock().queued_rows;
                if own_rows + queued >= self.config.max_batch {
                    break;
                }
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                if deadline - now < Duration::from_millis(1) {
                    tokio::task::yield_now().await;
                } else {
                    tokio::time::sleep_until(deadline).await;
                }
            }
        }
        let (reply, answer) = oneshot::channel();
        let mut jobs = vec![Job { model, inputs, reply }];
        let mut rows = own_rows;
        {
            let mut st = self.lock();
            while rows < self.config.max_batch
                && let Some(job) = st.queue.pop_front()
            {
                rows += job.inputs.rows();
                st.queued_rows -= job.inputs.rows();
                jobs.push(job);
            }
        }
        let batches = run_batch(jobs);
        self.batches.fetch_add(batches, Ordering::Relaxed);
        self.examples.fetch_add(rows as u64, Ordering::Relaxed);
        match answer.await {
            Ok(Outcome::Done(r)) => r,
            _ => Err(Error::Internal("a batch did not answer its leader".into())),
        }
    }

    /// Gives the lead to the oldest queued request still waiting, or ends
    /// leading.
    fn hand_over(&self) {
        let mut st = self.lock();
        while let Some(job) = st.queue.pop_front() {
            st.queued_rows -= job.inputs.rows();
            if job.reply.send(Outcome::Lead(job.model, job.inputs)).is_ok() {
                return;
            }
            // That request was cancelled; try the next.
        }
        st.leading = false;
    }
}

/// Hands the lead on when a leader ends, however it ends.
struct Handover<'a>(&'a Batcher);

impl Drop for Handover<'_> {
    fn drop(&mut self) {
        self.0.hand_over();
    }
}

/// Runs `jobs`, one forward pass per run of consecutive jobs on the same
/// model version, and answers each. Returns the number of passes.
fn run_batch(mut jobs: Vec<Job>) -> u64 {
    let mut passes = 0;
    while !jobs.is_empty() {
        let n = jobs.iter().take_while(|j| Arc::ptr_eq(&j.model, &jobs[0].model)).count();
        let rest = jobs.split_off(n);
        predict_group(jobs);
        passes += 1;
        jobs = rest;
    }
    passes
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
                let _ = reply.send(Outcome::Done(Ok(out[at..at + n * width].to_vec())));
                at += n * width;
            }
        }
        Err(e) => {
            // Every request was checked alone; a batch of checked requests
            // that fails is a bug, reported to each caller.
            let msg = e.to_string();
            for reply in replies {
                let _ = reply.send(Outcome::Done(Err(Error::Internal(format!("batch failed: {msg}")))));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use ps_model::{DenseTensor, ModelKind, SavedModel};

    use super::*;
    use crate::model::Servable;

    fn loaded(version: i64) -> Arc<Loaded> {
        let kind = ModelKind::Mlp { layers: vec![2, 3] };
        let dense = vec![
            DenseTensor { name: "fc1.weight".into(), shape: vec![2, 3], values: vec![version as f32; 6] },
            DenseTensor { name: "fc1.bias".into(), shape: vec![3], values: vec![0.0, 0.5, 1.0] },
        ];
        let model = Servable::new(SavedModel::new(kind, dense, Vec::new())).unwrap();
        Arc::new(Loaded { version, model, loaded_at_ms: 0, freshness: None })
    }

    fn alone(model: &Loaded, x: &[f32]) -> Vec<f32> {
        let mut out = Vec::new();
        model.model.predict(&Inputs::Dense { width: 2, values: x.to_vec() }, &mut out).unwrap();
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_of_two_versions_each_get_their_own_answer() {
        let b = Arc::new(Batcher::new(
            "m",
            BatchConfig { max_batch: 8, max_delay: Duration::from_micros(300), queue: 1000 },
        ));
        let (v1, v2) = (loaded(1), loaded(2));
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let (b, m) = (Arc::clone(&b), if i % 3 == 0 { Arc::clone(&v2) } else { Arc::clone(&v1) });
                tokio::spawn(async move {
                    let x = vec![i as f32 / 100.0, 1.0 - i as f32 / 200.0];
                    let got = b
                        .predict(Arc::clone(&m), Inputs::Dense { width: 2, values: x.clone() })
                        .await
                        .unwrap();
                    (got, alone(&m, &x))
                })
            })
            .collect();
        for t in tasks {
            let (got, want) = t.await.unwrap();
            assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6), "{got:?} vs {want:?}");
        }
        assert!(!b.lock().leading && b.lock().queue.is_empty(), "the lead ends with the work");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_leader_hands_the_lead_on() {
        // The first request leads and waits (max_delay) for company; it is
        // cancelled while it waits. The second, queued, must still finish.
        let b = Arc::new(Batcher::new(
            "m",
            BatchConfig { max_batch: 64, max_delay: Duration::from_millis(200), queue: 10 },
        ));
        let m = loaded(1);
        let x = Inputs::Dense { width: 2, values: vec![0.5, 0.5] };
        let leader = tokio::spawn({
            let (b, m, x) = (Arc::clone(&b), Arc::clone(&m), x.clone());
            async move { b.predict(m, x).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let follower = tokio::spawn({
            let (b, m, x) = (Arc::clone(&b), Arc::clone(&m), x.clone());
            async move { b.predict(m, x).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        leader.abort();
        let got =
            tokio::time::timeout(Duration::from_secs(5), follower).await.expect("no hang").unwrap().unwrap();
        assert_eq!(got, alone(&m, &[0.5, 0.5]));
        assert!(!b.lock().leading);
    }

    #[tokio::test]
    async fn a_full_queue_refuses() {
        let b = Batcher::new("m", BatchConfig { max_batch: 64, max_delay: Duration::ZERO, queue: 0 });
        b.lock().leading = true;
        let e = b.predict(loaded(1), Inputs::Dense { width: 2, values: vec![0.0, 0.0] }).await.unwrap_err();
        assert!(matches!(e, Error::Overloaded(_)), "{e}");
    }
}
