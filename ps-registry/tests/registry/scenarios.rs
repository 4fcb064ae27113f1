//! The scenarios: each opens the registry of its [`Env`] and checks one
//! promise of the registry, the same code for both databases.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;

use anyhow::{Context as _, ensure};
use futures::future::BoxFuture;
use ps_model::{DenseTensor, ModelKind, SavedModel};
use ps_registry::{ArtifactFault, Error, Lineage, NewVersion, Registry};

use crate::Env;

type Scenario = fn(Env) -> BoxFuture<'static, anyhow::Result<()>>;

pub const ALL: &[(&str, Scenario)] = &[
    ("register_list_show", |e| Box::pin(register_list_show(e))),
    ("promote", |e| Box::pin(promote(e))),
    ("rollback", |e| Box::pin(rollback(e))),
    ("concurrent_promotes", |e| Box::pin(concurrent_promotes(e))),
    ("crash_between_artifact_and_row", |e| Box::pin(crash_between_artifact_and_row(e))),
    ("corrupted_and_missing_artifacts", |e| Box::pin(corrupted_and_missing_artifacts(e))),
    ("sealed_artifacts", |e| Box::pin(sealed_artifacts(e))),
];

/// Scenarios of the PostgreSQL backend alone.
pub const POSTGRES: &[(&str, Scenario)] =
    &[("tls_required_and_checked", |e| Box::pin(tls_required_and_checked(e)))];

/// A small valid model (a 2-3-2 MLP) whose values, and so hash, depend on `seed`.
fn model(seed: u32) -> SavedModel {
    let t = |name: &str, shape: Vec<usize>| {
        let n = shape.iter().product::<usize>();
        DenseTensor {
            name: name.into(),
            shape,
            values: (0..n).map(|i| (seed * 100 + i as u32) as f32).collect(),
        }
    };
    SavedModel::new(
        ModelKind::Mlp { layers: vec![2, 3, 2] },
        vec![
            t("fc1.weight", vec![2, 3]),
            t("fc1.bias", vec![3]),
            t("fc2.weight", vec![3, 2]),
            t("fc2.bias", vec![2]),
        ],
        vec![],
    )
}

fn new_version(name: &str, seed: u32) -> NewVersion {
    NewVersion {
        model: name.into(),
        artifact: model(seed).to_bytes().unwrap(),
        metrics: BTreeMap::from([("test_accuracy".into(), 0.9 + f64::from(seed) / 1000.0)]),
        lineage: Lineage {
            run_config: Some(format!("[job]\nseed = {seed}\n")),
            data_checksums: BTreeMap::from([("data/train.gz".into(), "ab".repeat(32))]),
            source_run: Some(format!("runs/{seed}-test")),
            ..Lineage::default()
        },
        created_by: "tester".into(),
    }
}

async fn open(env: &Env) -> anyhow::Result<Registry> {
    Registry::open(&env.url, &env.root).await.with_context(|| format!("opening {}", env.url))
}

/// Registers `n` versions of `name` (seeds 1..=n).
async fn register_n(reg: &Registry, name: &str, n: u32) -> anyhow::Result<()> {
    for seed in 1..=n {
        reg.register(new_version(name, seed)).await?;
    }
    Ok(())
}

async fn register_list_show(env: Env) -> anyhow::Result<()> {
    let reg = open(&env).await?;
    let v1 = reg.register(new_version("mnist", 1)).await?;
    let v2 = reg.register(new_version("mnist", 2)).await?;
    let a1 = reg.register(new_version("a9a", 1)).await?;
    ensure!((v1.version, v2.version, a1.version) == (1, 2, 1), "versions are numbered per model");
    ensure!(v1.artifact.sha256 == a1.artifact.sha256, "same bytes, same artifact");
    ensure!(reg.models().await? == ["a9a", "mnist"]);
    ensure!(reg.versions(None).await?.len() == 3);
    ensure!(
        reg.versions(Some("mnist")).await? == [v1.clone(), v2.clone()],
        "a version reads back as registered"
    );
    ensure!(reg.version("mnist", 2).await? == v2);
    ensure!(reg.latest("mnist").await? == v2);
    ensure!(reg.load(&v2)? == model(2), "the artifact is the model");

    let mut child = new_version("mnist", 3);
    child.lineage.parent_version = Some(1);
    child.lineage.checkpoint = Some("ckpt-7".into());
    child.metrics.insert("diverged".into(), f64::NAN);
    let v3 = reg.register(child).await?;
    ensure!(!v3.metrics.contains_key("diverged"), "JSON has no NaN: such metrics are dropped");
    ensure!(reg.version("mnist", 3).await?.lineage == v3.lineage && v3.lineage.parent_version == Some(1));

    let mut orphan = new_version("mnist", 4);
    orphan.lineage.parent_version = Some(99);
    ensure!(matches!(reg.register(orphan).await, Err(Error::NoVersion { version: 99, .. })));
    let mut garbage = new_version("mnist", 4);
    garbage.artifact = b"not a model".to_vec();
    ensure!(matches!(reg.register(garbage).await, Err(Error::Model(_))));
    ensure!(matches!(reg.register(new_version("bad name", 1)).await, Err(Error::Name { .. })));
    ensure!(reg.latest("mnist").await?.version == 3, "refused registrations leave no version");
    ensure!(matches!(reg.version("mnist", 9).await, Err(Error::NoVersion { .. })));
    ensure!(matches!(reg.version("nope", 1).await, Err(Error::NoModel(_))));
    ensure!(reg.register(new_version("mnist", 5)).await?.version == 4, "no number was consumed");
    reg.close().await;

    // Everything is in the database, not in the handle.
    let again = open(&env).await?;
    ensure!(again.version("mnist", 2).await? == v2);
    Ok(())
}

async fn promote(env: Env) -> anyhow::Result<()> {
    let reg = open(&env).await?;
    register_n(&reg, "mnist", 3).await?;
    let m = reg.promote("mnist", 1, "staging", "alice").await?;
    ensure!((m.seq, m.from_version, m.to_version, m.action.as_str()) == (1, None, 1, "promote"));
    reg.promote("mnist", 2, "production", "alice").await?;
    let m = reg.promote("mnist", 3, "production", "bob").await?;
    ensure!((m.seq, m.from_version, m.to_version) == (2, Some(2), 3));
    ensure!(reg.label("mnist", "production").await? == 3 && reg.label("mnist", "staging").await? == 1);
    reg.promote("mnist", 3, "champion", "bob").await?;
    let labels: Vec<(String, i64)> =
        reg.labels(Some("mnist")).await?.into_iter().map(|l| (l.label, l.version)).collect();
    ensure!(
        labels == [("champion".into(), 3), ("production".into(), 3), ("staging".into(), 1)],
        "{labels:?}"
    );

    ensure!(matches!(
        reg.promote("mnist", 7, "production", "bob").await,
        Err(Error::NoVersion { version: 7, .. })
    ));
    ensure!(matches!(reg.promote("nope", 1, "production", "bob").await, Err(Error::NoVersion { .. })));
    ensure!(matches!(reg.promote("mnist", 1, "Prod!", "bob").await, Err(Error::Name { .. })));
    ensure!(reg.label("mnist", "production").await? == 3, "a refused promote moves nothing");
    let history = reg.history("mnist", Some("production")).await?;
    ensure!(
        history
            .iter()
            .map(|m| (m.seq, m.to_version, m.moved_by.as_str()))
            .eq([(1, 2, "alice"), (2, 3, "bob")])
    );
    ensure!(matches!(reg.label("mnist", "canary").await, Err(Error::NoLabel { .. })));
    Ok(())
}

async fn rollback(env: Env) -> anyhow::Result<()> {
    let reg = open(&env).await?;
    register_n(&reg, "mnist", 3).await?;
    reg.promote("mnist", 1, "production", "alice").await?;
    ensure!(matches!(reg.rollback("mnist", "production", "alice").await, Err(Error::NoHistory { .. })));
    ensure!(matches!(reg.rollback("mnist", "staging", "alice").await, Err(Error::NoLabel { .. })));
    reg.promote("mnist", 2, "production", "alice").await?;
    reg.promote("mnist", 3, "production", "alice").await?;

    let m = reg.rollback("mnist", "production", "bob").await?;
    ensure!((m.seq, m.action.as_str(), m.from_version, m.to_version) == (4, "rollback", Some(3), 2), "{m:?}");
    ensure!(reg.label("mnist", "production").await? == 2);
    // A rollback is a move like any other: rolling back again undoes it.
    reg.rollback("mnist", "production", "bob").await?;
    ensure!(reg.label("mnist", "production").await? == 3);
    let trail: Vec<(Option<i64>, i64)> = reg
        .history("mnist", Some("production"))
        .await?
        .iter()
        .map(|m| (m.from_version, m.to_version))
        .collect();
    ensure!(trail == [(None, 1), (Some(1), 2), (Some(2), 3), (Some(3), 2), (Some(2), 3)], "{trail:?}");
    Ok(())
}

/// Ten registry handles (ten connection pools, as ten processes would have)
/// open a new registry at once, then promote ten versions to one label at once.
async fn concurrent_promotes(env: Env) -> anyhow::Result<()> {
    const N: i64 = 10;
    let handles = futures::future::try_join_all((0..N).map(|_| open(&env))).await?;
    let reg = open(&env).await?;
    register_n(&reg, "mnist", N as u32).await?;
    let start = Arc::new(tokio::sync::Barrier::new(N as usize));
    let mut tasks = Vec::new();
    for (handle, v) in handles.into_iter().zip(1..=N) {
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let m = handle.promote("mnist", v, "production", &format!("user{v}")).await;
            handle.close().await;
            m
        }));
    }
    for t in tasks {
        t.await?.context("a concurrent promote failed")?;
    }
    let history = reg.history("mnist", Some("production")).await?;
    ensure!(history.len() == N as usize, "every move is in the history: {history:?}");
    let mut previous = None;
    for (i, m) in history.iter().enumerate() {
        ensure!(m.seq == i as i64 + 1, "gapless seq: {history:?}");
        ensure!(
            m.from_version == previous,
            "each move starts where the last ended (no lost update): {history:?}"
        );
        previous = Some(m.to_version);
    }
    let targets: BTreeSet<i64> = history.iter().map(|m| m.to_version).collect();
    ensure!(targets == (1..=N).collect(), "each promote moved the label once: {history:?}");
    ensure!(Some(reg.label("mnist", "production").await?) == previous, "the label ends on the last move");
    Ok(())
}

/// The child of the crash scenario: stores the artifact and writes the row,
/// says so, and waits, transaction open, for the parent to SIGKILL it (or
/// gives up after a minute).
pub fn crash_child(url: &str, root: &str) -> ExitCode {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let reg = Registry::open(url, Path::new(root)).await.unwrap();
        let pending = reg.prepare(new_version("crashy", 1)).await.unwrap();
        println!("prepared {} version {}", pending.version().artifact.sha256, pending.version().version);
        std::io::stdout().flush().unwrap();
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        ExitCode::FAILURE
    })
}

async fn crash_between_artifact_and_row(env: Env) -> anyhow::Result<()> {
    let reg = open(&env).await?;
    register_n(&reg, "mnist", 1).await?;

    // In process: a prepared version nobody commits is never visible.
    let pending = reg.prepare(new_version("mnist", 2)).await?;
    ensure!(pending.version().version == 2);
    ensure!(reg.latest("mnist").await?.version == 1, "an uncommitted version is invisible to others");
    drop(pending);

    // A real crash: a child process is SIGKILLed between the artifact and
    // the commit.
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["--crash-child", &env.url, &env.root.display().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    let read = child.stdout.take().map(|out| BufReader::new(out).read_line(&mut line));
    child.kill()?;
    let out = child.wait_with_output()?;
    ensure!(
        matches!(read, Some(Ok(n)) if n > 0),
        "child did not prepare: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sha = line
        .strip_prefix("prepared ")
        .and_then(|s| s.split_whitespace().next())
        .with_context(|| format!("unexpected child output: {line}"))?;

    ensure!(reg.models().await? == ["mnist"], "no model row survives the crash");
    ensure!(matches!(reg.latest("crashy").await, Err(Error::NoModel(_))));
    ensure!(reg.versions(None).await?.len() == 1);
    ensure!(reg.store().path(sha).exists(), "the artifact was on disk before the crash (now unreferenced)");
    // The orphan is harmless: the same bytes register normally, as version 1.
    let v = reg.register(new_version("crashy", 1)).await?;
    ensure!(v.version == 1 && v.artifact.sha256 == sha);
    ensure!(reg.load(&v)? == model(1));
    Ok(())
}

async fn corrupted_and_missing_artifacts(env: Env) -> anyhow::Result<()> {
    let reg = open(&env).await?;
    register_n(&reg, "mnist", 2).await?;
    let (v1, v2) = (reg.version("mnist", 1).await?, reg.version("mnist", 2).await?);
    let path = reg.artifact_path(&v1);

    // Same length, one byte flipped: the signature tells (a new registry
    // is signed by default: `sealed_artifacts`; unsigned, the hash would).
    let mut bytes = std::fs::read(&path)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, &bytes)?;
    let err = reg.load(&v1).unwrap_err();
    ensure!(
        matches!(&err, Error::Artifact { fault: ArtifactFault::Corrupted(m), .. } if m.contains("signature")),
        "{err}"
    );
    ensure!(err.to_string().contains("mnist version 1") && err.to_string().contains("is corrupted"), "{err}");
    std::fs::write(&path, &bytes[..10])?;
    ensure!(matches!(reg.artifact(&v1), Err(Error::Artifact { fault: ArtifactFault::Corrupted(_), .. })));

    std::fs::remove_file(reg.artifact_path(&v2))?;
    let err = reg.load(&v2).unwrap_err();
    ensure!(matches!(err, Error::Artifact { fault: ArtifactFault::Missing, .. }), "{err}");
    ensure!(err.to_string().contains("is missing"), "{err}");
    // The versions themselves are still listed, so the damage can be seen.
    ensure!(reg.versions(Some("mnist")).await?.len() == 2);
    // Registering the same bytes again repairs the file.
    reg.register(new_version("mnist", 1)).await?;
    ensure!(reg.load(&v1)? == model(1));
    Ok(())
}

/// A new registry signs its artifacts with `<root>/keys/`; every attack on a
/// file (flipped byte, truncation, another signer, no key, an unsigned file,
/// an encrypted file without its key) is refused by `Registry::load` with
/// the version and path named, and the file is left as it was.
async fn sealed_artifacts(env: Env) -> anyhow::Result<()> {
    use ps_common::seal::{self, KeyPaths};
    let reg = open(&env).await?;
    let v1 = reg.register(new_version("m", 1)).await?;
    let path = reg.artifact_path(&v1);
    let good = std::fs::read(&path)?;
    ensure!(seal::is_sealed(&good), "signed by default");
    ensure!(env.root.join("keys").join(seal::SIGNING_KEY_FILE).exists());
    ensure!(reg.load(&v1)? == model(1));

    let refused = |err: Error, what: &str, message: &str| -> anyhow::Result<()> {
        let text = err.to_string();
        ensure!(matches!(err, Error::Artifact { .. }), "{what}: {text}");
        ensure!(text.contains("m version 1") && text.contains(&path.display().to_string()), "{what}: {text}");
        ensure!(text.contains(message), "{what}: {text}");
        Ok(())
    };
    // A flipped byte in the payload, and a truncated file.
    let mut bad = good.clone();
    bad[good.len() / 2] ^= 0x10;
    std::fs::write(&path, &bad)?;
    refused(reg.load(&v1).unwrap_err(), "flipped byte", "signature does not verify")?;
    std::fs::write(&path, &good[..good.len() - 70])?;
    refused(reg.load(&v1).unwrap_err(), "truncated", "is corrupted")?;
    std::fs::write(&path, &good)?;

    // Opened with another key, or with none.
    let other = env.root.join("other-keys");
    seal::generate(&other, false)?;
    let by_other = Registry::open_with(&env.url, &env.root, Some(KeyPaths::in_dir(&other))).await?;
    refused(by_other.load(&v1).unwrap_err(), "another key", "not by the configured verify key")?;
    let no_keys = Registry::open_with(&env.url, &env.root, Some(KeyPaths::default())).await?;
    refused(no_keys.load(&v1).unwrap_err(), "no verify key", "no verify key is configured")?;

    // An unsigned artifact, once keys are configured.
    let v2 = no_keys.register(new_version("unsigned", 2)).await?;
    ensure!(!seal::is_sealed(&std::fs::read(reg.artifact_path(&v2))?));
    let err = reg.load(&v2).unwrap_err();
    ensure!(matches!(&err, Error::Artifact { fault: ArtifactFault::Refused(_), .. }), "{err}");
    ensure!(err.to_string().contains("not signed") && err.to_string().contains("--no-seal"), "{err}");

    // Encrypted: no model bytes on disk; without the key, refused.
    let enc = env.root.join("enc-keys");
    seal::generate(&enc, true)?;
    let encrypted = Registry::open_with(&env.url, &env.root, Some(KeyPaths::in_dir(&enc))).await?;
    let v3 = encrypted.register(new_version("secret", 3)).await?;
    let on_disk = std::fs::read(encrypted.artifact_path(&v3))?;
    let plain = model(3).to_bytes()?;
    ensure!(!on_disk.windows(32).any(|w| w == &plain[plain.len() - 32..]), "no plaintext on disk");
    ensure!(encrypted.load(&v3)? == model(3));
    let verify_only = env.root.join("verify-only");
    std::fs::create_dir_all(&verify_only)?;
    std::fs::copy(enc.join(seal::VERIFY_KEY_FILE), verify_only.join(seal::VERIFY_KEY_FILE))?;
    let reader = Registry::open_with(&env.url, &env.root, Some(KeyPaths::in_dir(&verify_only))).await?;
    let err = reader.load(&v3).unwrap_err();
    ensure!(err.to_string().contains("no encryption key is configured"), "{err}");

    // Nothing was changed by the refusals: the intact file loads.
    ensure!(std::fs::read(&path)? == good && reg.load(&v1)? == model(1));
    for r in [&by_other, &no_keys, &encrypted, &reader] {
        r.close().await;
    }
    Ok(())
}

/// The registry speaks TLS to PostgreSQL and checks whom it speaks to. The
/// test server rejects plaintext (`hostnossl ... reject`); the registry
/// opens with the server's CA, and refuses, before anything is written, a
/// CA that did not sign the server's certificate and no CA at all (the
/// Mozilla roots: a private CA is not among them). Asked for plaintext
/// (`sslmode=disable`), it is the server that refuses.
async fn tls_required_and_checked(env: Env) -> anyhow::Result<()> {
    let reg = open(&env).await?;
    register_n(&reg, "mnist", 1).await?;
    reg.close().await;
    let (other_ca, _) = crate::pg::test_ca("another CA")?;
    let other = env.root.join("other-ca.pem");
    std::fs::write(&other, other_ca)?;
    let base = env.url.split_once('?').map_or(env.url.as_str(), |(b, _)| b);
    for (what, url, expect) in [
        (
            "a CA that did not sign the server",
            format!("{base}?sslrootcert={}", other.display()),
            "certificate",
        ),
        ("no CA (the Mozilla roots)", base.to_string(), "certificate"),
        ("plaintext", format!("{base}?sslmode=disable"), "no encryption"),
    ] {
        match Registry::open(&url, &env.root).await {
            Ok(_) => anyhow::bail!("{what}: the registry opened"),
            Err(e) => {
                let msg = e.to_string();
                ensure!(matches!(e, Error::Db(_)), "{what}: {msg}");
                ensure!(msg.contains(expect), "{what}: expected `{expect}` in: {msg}");
            }
        }
    }
    let reg = open(&env).await?;
    ensure!(reg.versions(Some("mnist")).await?.len() == 1, "the refused opens changed nothing");
    Ok(())
}
