//! A worker's Prometheus metrics (`ps-worker --metrics ADDR` serves them at
//! `/metrics`): iterations and the time of each phase (pull, compute, push,
//! injected straggle), and the last progress and evaluation figures.
//!
//! [`MetricsReporter`] sits between the training loop and where its events
//! go: it updates the metrics from each event and each iteration's times
//! ([`Reporter::iteration`]) and passes the events on unchanged.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use ps_common::metrics::{ProcessCollector, Registry, latency_histogram};

use crate::event::{Event, IterationTimes, Reporter};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

type F64Gauge = Gauge<f64, AtomicU64>;

/// The metrics of one worker.
#[derive(Debug, Clone)]
pub struct WorkerMetrics {
    iterations: Counter,
    clock: Gauge,
    iteration_seconds: Histogram,
    phase_seconds: Family<PhaseLabels, Histogram, fn() -> Histogram>,
    loss: F64Gauge,
    accuracy: F64Gauge,
    samples_per_second: F64Gauge,
    test_loss: F64Gauge,
    test_score: F64Gauge,
    bytes_pushed: Counter,
    bytes_pulled: Counter,
    pushback_waits: Counter,
}

impl WorkerMetrics {
    /// A registry for worker `index` (every series labelled `worker`) with
    /// the process collector and the worker's metrics.
    pub fn registry(index: usize) -> (Registry, WorkerMetrics) {
        let label = std::iter::once(("worker".into(), index.to_string().into()));
        let mut r = Registry::with_labels(label);
        ProcessCollector::register(&mut r);
        let m = WorkerMetrics {
            iterations: Counter::default(),
            clock: Gauge::default(),
            iteration_seconds: latency_histogram(),
            phase_seconds: Family::new_with_constructor(latency_histogram),
            loss: F64Gauge::default(),
            accuracy: F64Gauge::default(),
            samples_per_second: F64Gauge::default(),
            test_loss: F64Gauge::default(),
            test_score: F64Gauge::default(),
            bytes_pushed: Counter::default(),
            bytes_pulled: Counter::default(),
            pushback_waits: Counter::default(),
        };
        r.register(
            "ps_worker_iterations",
            "Training iterations completed by this process",
            m.iterations.clone(),
        );
        r.register(
            "ps_worker_clock",
            "The worker's clock (iterations of the job, resumes included)",
            m.clock.clone(),
        );
        r.register(
            "ps_worker_iteration_seconds",
            "Wall time of one iteration (pull, compute, push, straggle)",
            m.iteration_seconds.clone(),
        );
        r.register(
            "ps_worker_phase_seconds",
            "Wall time of each phase of an iteration (pull, compute, push, straggle)",
            m.phase_seconds.clone(),
        );
        r.register("ps_worker_loss", "Mean training loss since the previous progress event", m.loss.clone());
        r.register(
            "ps_worker_accuracy",
            "Mean training accuracy since the previous progress event",
            m.accuracy.clone(),
        );
        r.register(
            "ps_worker_samples_per_second",
            "Training samples per second since the previous progress event",
            m.samples_per_second.clone(),
        );
        r.register("ps_worker_test_loss", "Test loss of the last evaluation", m.test_loss.clone());
        r.register(
            "ps_worker_test_score",
            "Test score of the last evaluation (accuracy, AUC or RMSE by workload)",
            m.test_score.clone(),
        );
        r.register(
            "ps_worker_pushed_bytes",
            "Protobuf bytes of the worker's pushes (counted when it finishes)",
            m.bytes_pushed.clone(),
        );
        r.register(
            "ps_worker_pulled_bytes",
            "Protobuf bytes of the worker's pull answers (counted when it finishes)",
            m.bytes_pulled.clone(),
        );
        r.register(
            "ps_worker_pushback_waits",
            "Requests a shard refused with a pushback (rate limit, bytes in flight) and the worker sent again (counted when it finishes)",
            m.pushback_waits.clone(),
        );
        (r, m)
    }

    fn event(&self, event: &Event) {
        match event {
            Event::Start { first_iter, .. } => {
                self.clock.set(*first_iter as i64);
            }
            Event::Progress { iter, loss, acc, samples_per_s, .. } => {
                self.clock.set(*iter as i64);
                self.loss.set(*loss);
                self.accuracy.set(*acc);
                self.samples_per_second.set(*samples_per_s);
            }
            Event::Eval { test_loss, test_acc, .. } => {
                self.test_loss.set(*test_loss);
                self.test_score.set(*test_acc);
            }
            Event::Done(d) => {
                self.bytes_pushed.inc_by(d.bytes_pushed);
                self.bytes_pulled.inc_by(d.bytes_pulled);
                self.pushback_waits.inc_by(d.pushback_waits);
            }
            Event::Metrics { .. } => {}
        }
    }

    fn iteration(&self, t: IterationTimes) {
        self.iterations.inc();
        let total = t.pull + t.compute + t.push + t.straggle;
        self.iteration_seconds.observe(total.as_secs_f64());
        for (phase, d) in
            [("pull", t.pull), ("compute", t.compute), ("push", t.push), ("straggle", t.straggle)]
        {
            self.phase_seconds.get_or_create(&PhaseLabels { phase }).observe(d.as_secs_f64());
        }
    }
}

/// A [`Reporter`] that updates [`WorkerMetrics`] and passes every event on.
pub struct MetricsReporter<'a> {
    pub inner: &'a mut dyn Reporter,
    pub metrics: WorkerMetrics,
}

impl Reporter for MetricsReporter<'_> {
    fn report(&mut self, event: Event) {
        self.metrics.event(&event);
        self.inner.report(event);
    }

    fn iteration(&mut self, times: IterationTimes) {
        self.metrics.iteration(times);
        self.inner.iteration(times);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn events_and_iterations_show_in_the_text() {
        let (registry, metrics) = WorkerMetrics::registry(3);
        let mut seen = Vec::new();
        let mut sink = |e: Event| seen.push(e);
        let mut r = MetricsReporter { inner: &mut sink, metrics };
        let ms = Duration::from_millis;
        r.iteration(IterationTimes { pull: ms(2), compute: ms(3), push: ms(5), straggle: Duration::ZERO });
        r.report(Event::Progress {
            worker: 3,
            epoch: 0,
            iter: 7,
            wall_s: 1.0,
            loss: 0.5,
            acc: 0.75,
            samples_per_s: 100.0,
        });
        r.report(Event::Done(crate::event::WorkerDone {
            worker: 3,
            pushback_waits: 4,
            ..Default::default()
        }));
        let text = ps_common::metrics::render(&registry);
        assert!(text.contains(r#"ps_worker_pushback_waits_total{worker="3"} 4"#), "{text}");
        assert!(text.contains(r#"ps_worker_iterations_total{worker="3"} 1"#), "{text}");
        assert!(text.contains(r#"ps_worker_clock{worker="3"} 7"#), "{text}");
        assert!(text.contains(r#"ps_worker_accuracy{worker="3"} 0.75"#), "{text}");
        assert!(text.contains(r#"ps_worker_phase_seconds_sum{worker="3",phase="push"} 0.005"#), "{text}");
        assert!(text.contains(r#"ps_worker_iteration_seconds_count{worker="3"} 1"#), "{text}");
        drop(r);
        assert_eq!(seen.len(), 2, "events pass through");
    }
}
