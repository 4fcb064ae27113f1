//! What signing and encrypting a checkpoint costs, beside the plain file.
//!
//! ```text
//! cargo run --release --example seal_cost -- [--params 16777216] [--reps 3]
//! ```
//!
//! Builds one shard holding a dense Adam tensor of `--params` values (values
//! plus two state slots: 12 bytes a parameter), then for each mode writes its
//! checkpoint file (`write_shard`: encode, seal, write, fsync, rename) and
//! reads it back (`read_shard`: read, SHA-256 against the manifest entry,
//! seal check, decode), best of `--reps`:
//!
//! - `plain`: no keys (the baseline, measured in the same run);
//! - `signed`: ed25519 over the whole file;
//! - `signed+encrypted`: AES-256-GCM, then ed25519 over the ciphertext.

use std::time::Instant;

use anyhow::{Result, bail};
use ps_common::optim::Rule;
use ps_common::seal::{Keys, new_encryption_key, new_signing_key};
use ps_common::spec::{Init, Layout, TableSpec};
use ps_server::checkpoint::{ShardFile, read_shard, write_shard};
use ps_server::clock::Clocks;
use ps_server::store::Store;

/// What sealing a checkpoint costs (see the file's doc comment).
#[derive(clap::Parser)]
struct Args {
    /// Parameters of the checkpointed table.
    #[arg(long, default_value_t = 16 << 20, value_parser = clap::value_parser!(u64).range(1..))]
    params: u64,
    /// Repetitions of each timed step.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    reps: u32,
}

fn main() -> Result<()> {
    let Args { params, reps } = <Args as clap::Parser>::parse();
    let store = Store::new(0, 1);
    let mut spec = TableSpec::dense("big", &[params], Init::zeros(), Rule::adam(1e-3).into());
    spec.layout = Layout::Dense { shape: vec![params], chunk_len: 1 << 16 };
    store.register(spec, 1)?;
    let file = ShardFile {
        checkpoint: "ckpt-000001".into(),
        shard: 0,
        num_shards: 1,
        clocks: Clocks::default().capture(),
        store: store.capture(),
    };
    drop(store);
    let dir = std::env::temp_dir().join(format!("ps-seal-cost-{}", std::process::id()));
    let signing = new_signing_key();
    let modes = [
        ("plain", Keys::none()),
        ("signed", Keys::new(Some(signing.clone()), None, None)),
        ("signed+encrypted", Keys::new(Some(signing), None, Some(new_encryption_key()))),
    ];
    println!("one shard file, {params} Adam parameters; best of {reps}; the machine may be shared");
    println!(
        "{:<18} {:>10} {:>10} {:>9} {:>10} {:>9}",
        "mode", "MB", "write ms", "x plain", "read ms", "x plain"
    );
    let mut plain: Option<(f64, f64)> = None;
    for (name, keys) in &modes {
        let (mut write_ms, mut read_ms, mut bytes) = (f64::INFINITY, f64::INFINITY, 0);
        for _ in 0..reps {
            let t = Instant::now();
            let entry = write_shard(&dir, &file, keys)?;
            write_ms = write_ms.min(t.elapsed().as_secs_f64() * 1e3);
            bytes = entry.bytes;
            let t = Instant::now();
            let back = read_shard(&dir, &entry, 0, 1, keys)?;
            read_ms = read_ms.min(t.elapsed().as_secs_f64() * 1e3);
            if back.store != file.store {
                bail!("{name}: the file read back differs");
            }
        }
        let (pw, pr) = *plain.get_or_insert((write_ms, read_ms));
        println!(
            "{name:<18} {:>10.1} {write_ms:>10.0} {:>9.2} {read_ms:>10.0} {:>9.2}",
            bytes as f64 / 1e6,
            write_ms / pw,
            read_ms / pr
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
