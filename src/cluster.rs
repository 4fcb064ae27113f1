//! A local cluster of OS processes: N shard processes and M worker processes
//! on loopback, all started from one executable (`<exe> server ...`,
//! `<exe> worker ...`), watched until the workers finish, then stopped.
//!
//! Every child is started with `kill_on_drop`, and on Linux with a parent-death
//! signal, so no process outlives the launcher however it ends.

use ps_common::seal::KeyPaths;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use ps_common::transport::{TlsConfig, TransportConfig};
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
    #[error(transparent)]
    Checkpoint(#[from] ps_server::Error),
    #[error("certificates: {0}")]
    Certificate(String),
    #[error("shard {shard} died ({exit}) and cannot be restored: {why}")]
    ShardDied { shard: u32, exit: String, why: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Sets up a child so it dies with the launcher (Linux `PR_SET_PDEATHSIG`)
/// and, with `cpu`, runs on that CPU only (every thread it starts too), with
/// one runtime thread (`PS_THREADS=1`) unless the launcher's environment
/// sets `PS_THREADS`: a second thread on the same CPU only takes turns with
/// the first, and waking it costs a task switch (measured: 3% more samples/s
/// and 4.5% less CPU, docs/PERFORMANCE.md).
fn command(exe: &Path, cpu: Option<usize>) -> Command {
    let mut cmd = Command::new(exe);
    cmd.kill_on_drop(true).stdin(Stdio::null());
    if cpu.is_some() && std::env::var_os("PS_THREADS").is_none() {
        cmd.env("PS_THREADS", "1");
    }
    #[cfg(target_os = "linux")]
    {
        let only = cpu.and_then(|c| {
            let mut set = nix::sched::CpuSet::new();
            set.set(c).ok().map(|()| set)
        });
        // SAFETY: prctl and sched_setaffinity are async-signal-safe system
        // calls, and the CPU set was made before the fork.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?;
                if let Some(set) = &only {
                    // Best effort: where a sandbox forbids it, the child
                    // runs unpinned rather than not at all.
                    let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), set);
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cpu;
    cmd
}

/// The CPUs the processes of a local cluster are pinned to
/// (`[cluster] pin_cpus`): the launcher's own allowed CPUs, taken in turn
/// by shard 0, 1, ... and then worker 0, 1, ...; on 2 CPUs, shard `k` and
/// worker `k` share CPU `k`, so half of each worker's traffic and each
/// shard's optimizer state stay in one core's cache (docs/PERFORMANCE.md,
/// twenty-first session).
#[derive(Debug, Clone, Default)]
pub struct Pinning {
    cpus: Vec<usize>,
    servers: usize,
}

impl Pinning {
    /// The pinning of `servers` shards and their workers, or none (each
    /// process may run anywhere) when off, not on Linux, or when the
    /// launcher may use only one CPU.
    pub fn new(on: bool, servers: u32) -> Pinning {
        let none = Pinning::default();
        if !on {
            return none;
        }
        #[cfg(target_os = "linux")]
        {
            let Ok(allowed) = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) else {
                return none;
            };
            let cpus: Vec<usize> =
                (0..nix::sched::CpuSet::count()).filter(|&c| allowed.is_set(c).unwrap_or(false)).collect();
            if cpus.len() < 2 {
                return none;
            }
            Pinning { cpus, servers: servers as usize }
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = servers;
            none
        }
    }

    /// Shard `k`'s CPU.
    pub fn server(&self, k: usize) -> Option<usize> {
        self.nth(k)
    }

    /// Worker `k`'s CPU.
    pub fn worker(&self, k: usize) -> Option<usize> {
        self.nth(self.servers + k)
    }

    fn nth(&self, i: usize) -> Option<usize> {
        (!self.cpus.is_empty()).then(|| self.cpus[i % self.cpus.len()])
    }
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

/// Running shard processes. With a checkpoint folder, a shard that dies is
/// restarted ([`Servers::supervise`]) on its address from the newest
/// complete checkpoint.
pub struct Servers {
    children: Vec<Child>,
    pub addrs: Vec<String>,
    /// Where each shard serves its Prometheus metrics (`/metrics`).
    pub metrics_addrs: Vec<String>,
    exe: PathBuf,
    log_dir: PathBuf,
    checkpoint_dir: Option<PathBuf>,
    security: Security,
    /// The public key the shards verify tokens with (auth on), kept for restarts.
    auth_key: Option<PathBuf>,
    /// The launcher's own credential towards these shards (admin).
    pub admin: ps_common::auth::Credential,
    seal: KeyPaths,
    /// Which CPU each shard (a restarted one too) and each worker runs
    /// on, if pinned.
    pub pinning: Pinning,
}

/// Where shards keep checkpoints and what they start from.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The shards' checkpoint folder (enables supervision).
    pub checkpoint_dir: Option<PathBuf>,
    /// Start every shard from this checkpoint.
    pub restore: Option<PathBuf>,
    /// How every process of the cluster talks.
    pub security: Security,
    /// Turn auth on, with this token public key (`--auth-key`).
    pub auth_key: Option<PathBuf>,
    /// The keys that seal and check the shards' checkpoint files.
    pub seal: KeyPaths,
    /// Which CPU each shard runs on, if pinned.
    pub pinning: Pinning,
}

/// How the processes of a local cluster talk: mutual TLS with the
/// certificates `ps-cluster certs` made in a folder (the default), or
/// plaintext when the run asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Security {
    Tls(PathBuf),
    Plaintext,
}

impl Security {
    /// The flags that give a child process its TLS (it picks its own
    /// certificate in the folder by role and index).
    pub fn args(&self) -> Vec<std::ffi::OsString> {
        match self {
            Security::Tls(dir) => vec!["--tls-dir".into(), dir.clone().into_os_string()],
            Security::Plaintext => vec!["--plaintext".into()],
        }
    }

    /// `base` with this security, for the launcher's own channels (as
    /// `admin`: stats, checkpoints, the final evaluation).
    pub fn admin_transport(&self, base: &TransportConfig) -> TransportConfig {
        base.with_tls(match self {
            Security::Tls(dir) => Some(TlsConfig::from_dir(dir, "admin")),
            Security::Plaintext => None,
        })
    }
}

/// A shard that died and was restarted from a checkpoint.
#[derive(Debug, Clone)]
pub struct Restart {
    pub shard: u32,
    /// How it ended (exit status or signal).
    pub exit: String,
    pub checkpoint: ps_server::checkpoint::CheckpointRef,
    /// From noticing the death to the shard listening again.
    pub restart_s: f64,
}

impl Servers {
    /// Starts `n` shards on 127.0.0.1 (free ports), logs in `dir`.
    pub async fn start(exe: &Path, n: u32, dir: &Path, opts: &ServerOptions) -> Result<Servers> {
        let mut servers = Servers {
            children: Vec::new(),
            addrs: Vec::new(),
            metrics_addrs: Vec::new(),
            exe: exe.to_path_buf(),
            log_dir: dir.to_path_buf(),
            checkpoint_dir: opts.checkpoint_dir.clone(),
            security: opts.security.clone(),
            auth_key: opts.auth_key.clone(),
            admin: ps_common::auth::Credential::none(),
            seal: opts.seal.clone(),
            pinning: opts.pinning.clone(),
        };
        for shard in 0..n {
            // Port 0 for both: each shard binds its own ports and tells them,
            // so no other process can take a port between choice and bind.
            let (child, addr, metrics) =
                servers.spawn(shard, n, "127.0.0.1:0", "127.0.0.1:0", opts.restore.as_deref()).await?;
            servers.addrs.push(addr);
            servers.metrics_addrs.push(metrics);
            servers.children.push(child);
        }
        Ok(servers)
    }

    /// Starts shard `shard` of `n` listening on `listen` (metrics on
    /// `metrics`); waits until it is ready and returns its gRPC and metrics
    /// addresses, as the shard printed them.
    async fn spawn(
        &self,
        shard: u32,
        n: u32,
        listen: &str,
        metrics: &str,
        restore: Option<&Path>,
    ) -> Result<(Child, String, String)> {
        let log_path = self.log_dir.join(format!("server-{shard}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("opening {}", log_path.display())))?;
        let mut cmd = command(&self.exe, self.pinning.server(shard as usize));
        cmd.args(["server", "--shard", &shard.to_string(), "--num-shards", &n.to_string()])
            .args(["--listen", listen]);
        if let Some(dir) = &self.checkpoint_dir {
            cmd.arg("--checkpoint-dir").arg(dir);
        }
        if let Some(path) = restore {
            cmd.arg("--restore").arg(path);
        }
        if let Some(key) = &self.auth_key {
            cmd.arg("--auth-key").arg(key);
        }
        let seal = &self.seal;
        for (flag, path) in [
            ("--signing-key", &seal.signing_key),
            ("--verify-key", &seal.verify_key),
            ("--encryption-key", &seal.encryption_key),
        ] {
            if let Some(p) = path {
                cmd.arg(flag).arg(p);
            }
        }
        cmd.args(["--metrics", metrics]);
        // The data plane on a Unix socket too, for the workers on this host
        // (they use it instead of loopback TCP). A run folder too deep for a
        // socket's path leaves them on TCP.
        let socket = self.log_dir.join(format!("shard-{shard}.sock"));
        if socket.as_os_str().len() <= ps_server::dataplane::MAX_SOCKET_PATH {
            cmd.arg("--data-socket").arg(&socket);
        } else {
            tracing::warn!(path = %socket.display(), "run folder too deep for a Unix socket; the data plane stays on TCP");
        }
        cmd.args(self.security.args());
        if matches!(self.security, Security::Tls(_)) {
            cmd.arg("--client-auth");
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(io(format!("starting shard {shard} from {}", self.exe.display())))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let fail = |reason: String| Error::ServerStart { shard, reason, log: log_path.display().to_string() };
        // The shard prints both lines at once, when it is ready.
        let addr = announced(&mut lines, "listening on ").await.map_err(fail)?;
        let metrics = announced(&mut lines, "metrics on ").await.map_err(fail)?;
        Ok((child, addr, metrics))
    }

    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().filter_map(Child::id).collect()
    }

    /// SIGKILL to shard `shard` (fault injection).
    pub fn kill(&mut self, shard: usize) {
        if let Some(c) = self.children.get_mut(shard) {
            let _ = c.start_kill();
        }
    }

    /// Restarts, on its address and from the newest complete checkpoint, the
    /// first shard found dead. Without a checkpoint folder, or before the
    /// first checkpoint, a dead shard is an error: nothing can bring its
    /// parameters back.
    pub async fn supervise(&mut self) -> Result<Option<Restart>> {
        let n = self.children.len() as u32;
        for shard in 0..self.children.len() {
            let Ok(Some(status)) = self.children[shard].try_wait() else { continue };
            let noticed = Instant::now();
            let exit = status.to_string();
            let Some(root) = &self.checkpoint_dir else {
                return Err(Error::ShardDied {
                    shard: shard as u32,
                    exit,
                    why: "checkpoints are off".into(),
                });
            };
            let keys = self.seal.load().map_err(|e| Error::Config(e.to_string()))?;
            let checkpoint = ps_server::checkpoint::latest(root, &keys)?.ok_or_else(|| Error::ShardDied {
                shard: shard as u32,
                exit: exit.clone(),
                why: "no checkpoint was complete yet".into(),
            })?;
            tracing::warn!(shard, %exit, checkpoint = %checkpoint.dir.display(), "shard died; restarting it");
            // The same ports again: the workers know the one, metrics.txt the other.
            let (listen, metrics) = (self.addrs[shard].clone(), self.metrics_addrs[shard].clone());
            let (child, _, _) = self.spawn(shard as u32, n, &listen, &metrics, Some(&checkpoint.dir)).await?;
            self.children[shard] = child;
            return Ok(Some(Restart {
                shard: shard as u32,
                exit,
                checkpoint,
                restart_s: noticed.elapsed().as_secs_f64(),
            }));
        }
        Ok(None)
    }

    /// Whether a checkpoint could restore a shard now: checkpoints are off,
    /// or one is complete (then a shard killed by fault injection tests
    /// recovery, not the error of dying before the first checkpoint).
    fn recoverable(&self) -> bool {
        let Some(root) = &self.checkpoint_dir else { return true };
        let Ok(keys) = self.seal.load() else { return true };
        ps_server::checkpoint::latest(root, &keys).is_ok_and(|c| c.is_some())
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

/// How long a shard may take to say it is ready: restoring a checkpoint
/// comes first, and a large one takes a while. A shard that dies is seen at
/// once (its stdout closes).
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// The address a shard announces on its next stdout line, `PREFIX ADDR`.
async fn announced(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    prefix: &str,
) -> std::result::Result<String, String> {
    let line = tokio::time::timeout(START_TIMEOUT, lines.next_line())
        .await
        .map_err(|_| format!("not ready within {} s", START_TIMEOUT.as_secs()))?
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "exited before listening".to_string())?;
    line.strip_prefix(prefix)
        .map(str::to_string)
        .ok_or_else(|| format!("`{line}` where `{prefix}ADDR` was expected"))
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
    /// Shards that died and were restored from a checkpoint.
    pub recoveries: Vec<crate::artifact::Recovery>,
}

/// Options of [`run_workers`].
pub struct RunOptions<'a> {
    pub exe: &'a Path,
    pub run_dir: &'a Path,
    pub config_path: &'a Path,
    pub workers: u32,
    /// Kill this worker (SIGKILL) after this long: for fault-tolerance tests.
    pub kill_worker_after: Option<(usize, Duration)>,
    /// Kill this shard (SIGKILL) after this long: for recovery tests.
    pub kill_server_after: Option<(usize, Duration)>,
    /// Append to metrics.jsonl (a resumed run) instead of starting it anew.
    pub append_metrics: bool,
    /// How the workers talk to the shards.
    pub security: &'a Security,
    /// The launcher's own channels (measuring a recovery).
    pub transport: &'a TransportConfig,
    /// Issues each worker its token (`PS_TOKEN_FILE`); `None`: auth off.
    pub auth: Option<&'a crate::credentials::LocalAuth>,
}

/// Starts the workers of `config` against `servers`, forwards their events
/// (worker index, event) to `on_event` and appends them to
/// `run_dir/metrics.jsonl`, until every worker exits or Ctrl-C.
pub async fn run_workers(
    opts: RunOptions<'_>,
    servers: &mut Servers,
    mut on_event: impl FnMut(usize, &Event),
) -> Result<RunOutcome> {
    let started = Instant::now();
    let mut metrics = MetricsLine::create(opts.run_dir, opts.append_metrics)?;
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Option<Event>, Option<String>)>();
    let mut children = Vec::new();
    // The shards' endpoints now, each worker's when it reports the port it bound.
    let mut endpoints = MetricsFile::create(opts.run_dir, &servers.metrics_addrs, opts.security)?;
    for index in 0..opts.workers as usize {
        let log_path = opts.run_dir.join(format!("worker-{index}.log"));
        let log = std::fs::File::create(&log_path).map_err(io(format!("creating {}", log_path.display())))?;
        let mut cmd = command(opts.exe, servers.pinning.worker(index));
        if let Some(auth) = opts.auth {
            let token = auth.token_file(ps_common::auth::Principal::Worker(index as u64))?;
            cmd.env(ps_common::auth::TOKEN_FILE_ENV, token);
        }
        let mut child = cmd
            .arg("worker")
            .arg("--config")
            .arg(opts.config_path)
            .args(["--servers", &servers.addrs.join(",")])
            .args(["--index", &index.to_string(), "--workers", &opts.workers.to_string()])
            .args(["--metrics", "127.0.0.1:0"])
            .args(opts.security.args())
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
    let kill_server_at = opts.kill_server_after.map(|(s, after)| (s, tokio::time::Instant::now() + after));
    let mut server_killed = false;
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
                if let Some(e) = event.and_then(|e| endpoints.take(e)) {
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
                if let Some((s, at)) = kill_server_at
                    && !server_killed && tokio::time::Instant::now() >= at
                    && servers.recoverable()
                {
                    tracing::warn!(shard = s, "fault injection: SIGKILL to a shard");
                    servers.kill(s);
                    server_killed = true;
                }
                if let Some(restart) = servers.supervise().await? {
                    let recovery = crate::artifact::Recovery::measure(&restart, &servers.addrs, &servers.admin, started, opts.transport).await;
                    eprintln!("{}", recovery.describe());
                    outcome.recoveries.push(recovery);
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
        let Some(e) = endpoints.take(e) else { continue };
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

/// The file of a run folder that lists each process's metrics endpoint.
pub const METRICS_FILE: &str = "metrics.txt";

/// `metrics.txt`: one line per process, `shard-N URL` or `worker-N URL`, so
/// that a user can curl them while the run trains (HTTPS with TLS on: a
/// shard's certificate names 127.0.0.1, worker N's names `worker-N`). The
/// shards' lines are written at once; a worker's when it reports the port
/// it bound.
struct MetricsFile {
    path: PathBuf,
    file: std::fs::File,
    scheme: &'static str,
}

impl MetricsFile {
    fn create(run_dir: &Path, shards: &[String], security: &Security) -> Result<MetricsFile> {
        let path = run_dir.join(METRICS_FILE);
        let file = std::fs::File::create(&path).map_err(io(format!("creating {}", path.display())))?;
        let scheme = if matches!(security, Security::Tls(_)) { "https" } else { "http" };
        let mut f = MetricsFile { path, file, scheme };
        for (i, addr) in shards.iter().enumerate() {
            f.add(&format!("shard-{i}"), addr);
        }
        tracing::info!(file = %f.path.display(), "metrics endpoints written");
        Ok(f)
    }

    /// Takes a worker's [`Event::Metrics`] (its line written); hands back
    /// any other event.
    fn take(&mut self, event: Event) -> Option<Event> {
        match event {
            Event::Metrics { worker, addr } => {
                self.add(&format!("worker-{worker}"), &addr.to_string());
                None
            }
            e => Some(e),
        }
    }

    /// Appends one process's line. A full disk loses the line, not the run.
    fn add(&mut self, process: &str, addr: &str) {
        use std::io::Write;
        if let Err(e) = writeln!(self.file, "{process} {}://{addr}/metrics", self.scheme) {
            tracing::warn!(file = %self.path.display(), error = %e, "cannot write a metrics endpoint");
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_then_workers_take_the_cpus_in_turn() {
        let pin = Pinning { cpus: vec![3, 5], servers: 2 };
        let got: Vec<_> = [pin.server(0), pin.server(1), pin.worker(0), pin.worker(1), pin.worker(2)].into();
        assert_eq!(got, [Some(3), Some(5), Some(3), Some(5), Some(3)]);
        let off = Pinning::new(false, 2);
        assert_eq!((off.server(0), off.worker(0)), (None, None));
    }

    /// A pinned child and every thread it starts run on its CPU only, with
    /// one runtime thread.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_pinned_child_runs_on_its_cpu() {
        let pin = Pinning::new(true, 1);
        let Some(cpu) = pin.worker(0) else {
            // One allowed CPU: nothing is pinned, by design.
            assert!(Pinning::new(true, 1).server(0).is_none());
            return;
        };
        let out = command(Path::new("/bin/sh"), Some(cpu))
            .args(["-c", "grep Cpus_allowed_list /proc/self/status; echo threads $PS_THREADS"])
            .output()
            .await
            .expect("run sh");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.split_whitespace().nth(1), Some(cpu.to_string().as_str()), "{text}");
        if std::env::var_os("PS_THREADS").is_none() {
            assert!(text.contains("threads 1"), "{text}");
        }
        let free = command(Path::new("/bin/sh"), None)
            .args(["-c", "grep Cpus_allowed_list /proc/self/status"])
            .output()
            .await
            .expect("run sh");
        let free = String::from_utf8_lossy(&free.stdout);
        assert_ne!(free.lines().next(), text.lines().next(), "an unpinned child may run anywhere");
    }
}
