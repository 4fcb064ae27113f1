//! A local cluster of OS processes: N shard processes and M worker processes
//! on loopback, all started from one executable (`<exe> server ...`,
//! `<exe> worker ...`), watched until the workers finish, then stopped.
//!
//! Every child is started with `kill_on_drop`, and on Linux with a parent-death
//! signal, so no process outlives the launcher however it ends.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use ps_worker::config::RunConfig;
use ps_worker::event::Event;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::artifact::{MetricsLine, MetricsWriter};

/// Errors of the launcher library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("shard {shard} did not start: {reason} (see {log})")]
    ServerStart { shard: u32, reason: String, log: String },
    #[error("interrupted")]
    Interrupted,
    #[error(transparent)]
    Worker(#[from] ps_worker::Error),
    #[error("invalid run config: {0}")]
    Config(String),
    #[error(transparent)]
    Artifact(#[from] crate::artifact::Error),
    #[error(transparent)]
    Model(#[from] ps_model::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Sets up a child so it dies with the launcher (Linux `PR_SET_PDEATHSIG`).
fn command(exe: &Path) -> Command {
    let mut cmd = Command::new(exe);
    cmd.kill_on_drop(true).stdin(Stdio::null());
    #[cfg(target_os = "linux")]
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM).map_err(std::io::Error::from)
        });
    }
    cmd
}

/// Sends SIGTERM (graceful stop) to a child.
fn terminate(child: &Child) {
    if let Some(pid) = child.id() {
        let _ =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
    }
}

/// Peak resident memory of a process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Running shard processes.
pub struct Servers {
    children: Vec<Child>,
    pub addrs: Vec<String>,
}

impl Servers {
    /// Starts `n` shards on 127.0.0.1 (free ports), logs in `dir`.
    pub async fn start(exe: &Path, n: u32, dir: &Path) -> Result<Servers> {
        let mut children = Vec::new();
        let mut addrs = Vec::new();
        for shard in 0..n {
            let log_path = dir.join(format!("server-{shard}.log"));
            let log =
                std::fs::File::create(&log_path).map_err(io(format!("creating {}", log_path.display())))?;
            let mut child = command(exe)
                .args(["server", "--shard", &shard.to_string(), "--num-shards", &n.to_string()])
                .args(["--listen", "127.0.0.1:0"])
                .stdout(Stdio::piped())
                .stderr(log)
                .spawn()
                .map_err(io(format!("starting shard {shard} from {}", exe.display())))?;
            let stdout = child.stdout.take().expect("stdout is piped");
            let mut lines = BufReader::new(stdout).lines();
            let fail =
                |reason: String| Error::ServerStart { shard, reason, log: log_path.display().to_string() };
            let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                .await
                .map_err(|_| fail("no address within 30 s".into()))?
                .map_err(|e| fail(e.to_string()))?
                .ok_or_else(|| fail("exited before listening".into()))?;
            let addr = first
                .strip_prefix("listening on ")
                .ok_or_else(|| fail(format!("unexpected first line `{first}`")))?
                .to_string();
            addrs.push(addr);
            children.push(child);
        }
        Ok(Servers { children, addrs })
    }

    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().filter_map(Child::id).collect()
    }

    /// SIGTERM to every shard; SIGKILL to any still running after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        for c in &self.children {
            terminate(c);
        }
        for c in &mut self.children {
            if tokio::time::timeout(grace, c.wait()).await.is_err() {
                let _ = c.kill().await;
            }
        }
    }
}

/// What the launcher learns from a run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RunOutcome {
    pub wall_s: f64,
    /// The `Done` event of each worker that finished.
    pub done: Vec<Event>,
    /// (worker index, exit description) of workers that failed.
    pub failed: Vec<(usize, String)>,
    /// Peak RSS of each server process, bytes.
    pub server_peak_rss: Vec<u64>,
}

/// Options of [`run_workers`].
pub struct RunOptions<'a> {
    pub exe: &'a Path,
    pub run_dir: &'a Path,
    pub config_path: &'a Path,
    pub workers: u32,
    /// Kill this worker (SIGKILL) after this long: for fault-tolerance tests.
    pub kill_worker_after: Option<(usize, Duration)>,
}

/// Starts the workers of `config` against `servers`, forwards their events
/// (worker index, event) to `on_event` and appends them to
/// `run_dir/metrics.jsonl`, until every worker exits or Ctrl-C.
pub async fn run_workers(
    opts: RunOptions<'_>,
    servers: &Servers,
    mut on_event: impl FnMut(usize, &Event),
) -> Result<RunOutcome> {
    let started = Instant::now();
    let mut metrics = MetricsLine::create(opts.run_dir)?;
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Option<Event>, Option<String>)>();
    let mut children = Vec::new();
    for index in 0..opts.workers as usize {
        let log_path = opts.run_dir.join(format!("worker-{index}.log"));
        let log = std::fs::File::create(&log_path).map_err(io(format!("creating {}", log_path.display())))?;
        let mut child = command(opts.exe)
            .arg("worker")
            .arg("--config")
            .arg(opts.config_path)
            .args(["--servers", &servers.addrs.join(",")])
            .args(["--index", &index.to_string(), "--workers", &opts.workers.to_string()])
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(io(format!("starting worker {index}")))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Event>(&line) {
                    Ok(e) => {
                        let _ = tx.send((index, Some(e), None));
                    }
                    Err(_) => tracing::debug!(worker = index, line, "non-event output"),
                }
            }
        });
        children.push(Some(child));
    }
    drop(tx);

    let mut outcome = RunOutcome::default();
    let mut remaining = children.len();
    let kill_at = opts.kill_worker_after.map(|(w, after)| (w, tokio::time::Instant::now() + after));
    let mut killed = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    while remaining > 0 {
        tokio::select! {
            _ = &mut ctrl_c => {
                for c in children.iter_mut().flatten() {
                    let _ = c.kill().await;
                }
                return Err(Error::Interrupted);
            }
            Some((index, event, _)) = rx.recv() => {
                if let Some(e) = event {
                    record(&mut metrics, started, index, &e);
                    if matches!(e, Event::Done(_)) {
                        outcome.done.push(e.clone());
                    }
                    on_event(index, &e);
                }
            }
            _ = poll.tick() => {
                if let Some((w, at)) = kill_at
                    && !killed && tokio::time::Instant::now() >= at
                    && let Some(c) = children.get_mut(w).and_then(Option::as_mut)
                {
                    let _ = c.start_kill();
                    killed = true;
                }
                for (index, slot) in children.iter_mut().enumerate() {
                    let Some(c) = slot else { continue };
                    if let Ok(Some(status)) = c.try_wait() {
                        if !status.success() {
                            outcome.failed.push((index, format!("{status}; see worker-{index}.log")));
                        }
                        *slot = None;
                        remaining -= 1;
                    }
                }
            }
        }
    }
    // Drain events still buffered after the last exit.
    while let Ok((index, Some(e), _)) = rx.try_recv() {
        record(&mut metrics, started, index, &e);
        if matches!(e, Event::Done(_)) {
            outcome.done.push(e.clone());
        }
        on_event(index, &e);
    }
    outcome.wall_s = started.elapsed().as_secs_f64();
    outcome.server_peak_rss = servers.pids().into_iter().filter_map(peak_rss).collect();
    Ok(outcome)
}

/// Appends an event to `metrics.jsonl`. A full disk loses curve points, not the run.
fn record(metrics: &mut MetricsWriter, started: Instant, worker: usize, event: &Event) {
    let line = MetricsLine::new(started.elapsed().as_secs_f64(), worker, event.clone());
    if let Err(e) = metrics.append(&line) {
        tracing::warn!(error = %e, "cannot record a worker event");
    }
}

/// A fresh run folder `<root>/<timestamp>-<name>`.
pub fn new_run_dir(root: &Path, name: &str) -> Result<PathBuf> {
    let stamp =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let mut dir = root.join(format!("{stamp}-{name}"));
    let mut n = 1;
    while dir.exists() {
        n += 1;
        dir = root.join(format!("{stamp}-{name}-{n}"));
    }
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    Ok(dir)
}

/// Writes the effective config to `dir/config.toml` and returns its path.
pub fn write_config(dir: &Path, config: &RunConfig) -> Result<PathBuf> {
    let path = dir.join("config.toml");
    let text = toml::to_string_pretty(config).map_err(|e| Error::Config(e.to_string()))?;
    std::fs::write(&path, text).map_err(io(format!("writing {}", path.display())))?;
    Ok(path)
}
