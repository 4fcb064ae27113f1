//! The registry's scenarios, each run twice: against SQLite (a file in a
//! temporary folder) and against a real PostgreSQL server that this binary
//! starts on loopback before the first scenario and stops after the last
//! (see `pg.rs`). Every scenario gets a fresh database and artifact folder.
//!
//! A custom harness (`harness = false`) so the server is started once and
//! stopped even when a scenario panics; it prints libtest's summary line.
//! `registry --crash-child URL ROOT` is the child process of the crash
//! scenario.

mod pg;
mod scenarios;

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use futures::FutureExt as _;
use sqlx::{Connection as _, Executor as _};

/// Where one scenario's registry lives.
pub struct Env {
    pub url: String,
    pub root: PathBuf,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, url, root] = args.as_slice()
        && flag == "--crash-child"
    {
        return scenarios::crash_child(url, root);
    }
    let filter = args.iter().skip(1).find(|a| !a.starts_with('-')).cloned().unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    sqlx::any::install_default_drivers();

    let started = Instant::now();
    let pg = match pg::Postgres::start() {
        Ok(pg) => pg,
        Err(e) => {
            eprintln!("error: cannot start the PostgreSQL server the registry tests need: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let tmp = std::env::temp_dir().join(format!("ps-registry-test-{}", std::process::id()));
    let (mut passed, mut failed) = (0, Vec::new());
    for backend in ["sqlite", "postgres"] {
        let only_here: &[_] = if backend == "postgres" { scenarios::POSTGRES } else { &[] };
        for (name, scenario) in scenarios::ALL.iter().chain(only_here) {
            let id = format!("{backend}::{name}");
            if !id.contains(&filter) {
                continue;
            }
            let root = tmp.join(id.replace("::", "-"));
            let t = Instant::now();
            let result = rt.block_on(async {
                let url = match backend {
                    "sqlite" => format!("sqlite://{}/registry.db", root.display()),
                    _ => {
                        let mut admin = sqlx::AnyConnection::connect(&format!(
                            "{}&sslmode=verify-full",
                            pg.url("postgres")
                        ))
                        .await?;
                        admin.execute(format!("CREATE DATABASE {name}").as_str()).await?;
                        pg.url(name)
                    }
                };
                AssertUnwindSafe(scenario(Env { url, root: root.clone() }))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|panic| {
                        let msg = panic
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        Err(anyhow::anyhow!("panicked: {msg}"))
                    })
            });
            match result {
                Ok(()) => {
                    println!("test {id} ... ok ({:.2}s)", t.elapsed().as_secs_f64());
                    passed += 1;
                }
                Err(e) => {
                    println!("test {id} ... FAILED\n    {e:#}");
                    failed.push(id);
                }
            }
        }
    }
    drop(pg);
    let _ = std::fs::remove_dir_all(&tmp);
    println!(
        "\ntest result: {}. {passed} passed; {} failed; 0 ignored; 0 measured; 0 filtered out; finished in {:.2}s",
        if failed.is_empty() { "ok" } else { "FAILED" },
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!("failures: {failed:?}");
        ExitCode::FAILURE
    }
}
