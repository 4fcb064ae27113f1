//! Wire codecs against real shards on loopback: error feedback delivers
//! every gradient through every lossy codec, dense and sparse; the shard
//! refuses a push in another codec than its table's, and hostile encodings,
//! with INVALID_ARGUMENT and no change; a compressed push is applied once
//! however often it is replayed; pulls travel in the table's pull codec only
//! when asked, so evaluators read exact values.

use anyhow::{Context, Result, ensure};
use ps_common::codec::SharedF32;
use ps_common::compress::{self, Codec, CodecKind, Codecs};
use ps_common::optim::Rule;
use ps_common::partition::{chunk_range, chunk_shard};
use ps_common::spec::{Init, InitKind, Layout, TableSpec};
use ps_common::wire::pb;
use ps_server::local::LocalShards;
use ps_worker::client::{DenseSet, ShardedClient};
use rand::{Rng, SeedableRng};
use tonic::Code;

use crate::util::{raw_client, sharded_client};

const SHARDS: u32 = 2;
const W: &str = "w";
const W_LEN: usize = 1000;
const W_CHUNK: usize = 128;
const E: &str = "e";
const E_DIM: usize = 4;
const KEYS: u64 = 40;

/// SGD with lr 1 makes `init - value` the sum of what the shards applied.
fn tables(codecs: Codecs) -> (TableSpec, TableSpec) {
    let init = Init { kind: InitKind::Uniform { low: -1.0, high: 1.0 }, seed: 5 };
    let mut w = TableSpec::dense(W, &[W_LEN as u64], init, Rule::sgd(1.0).into());
    w.layout = Layout::Dense { shape: vec![W_LEN as u64], chunk_len: W_CHUNK as u32 };
    let mut e = TableSpec::sparse(E, E_DIM as u32, init, Rule::sgd(1.0).into());
    (w.codecs, e.codecs) = (codecs, codecs);
    (w, e)
}

/// Exact values of `W`, read by a client that registered nothing (so reads
/// f32).
async fn exact_dense(shards: &LocalShards, set: &DenseSet) -> Result<Vec<f32>> {
    let reader = sharded_client(shards, 0).await;
    let mut dense = vec![0.0; set.len()];
    reader.pull_dense(set, 0, &mut dense).await?;
    Ok(dense)
}

/// Exact values of `W` and of rows `0..KEYS` of `E`.
async fn exact(shards: &LocalShards, set: &DenseSet) -> Result<(Vec<f32>, Vec<f32>)> {
    let reader = sharded_client(shards, 0).await;
    let dense = exact_dense(shards, set).await?;
    let keys: Vec<u64> = (0..KEYS).collect();
    let mut rows = vec![0.0; keys.len() * E_DIM];
    reader.lookup_sparse(E, E_DIM, &keys, 0, &mut rows).await?;
    Ok((dense, rows))
}

/// Pushes 15 random dense and sparse gradients through `codec` with error
/// feedback; then what the shards applied plus the worker's residual is the
/// sum of the gradients, element by element.
async fn check_feedback_conserves(codec: Codec) -> Result<()> {
    let shards = LocalShards::start(SHARDS).await.context("start shards")?;
    let (w, e) = tables(Codecs { push: codec, pull: Codec::F32 });
    let mut c = sharded_client(&shards, 1).await;
    c.register(&w).await?;
    c.register(&e).await?;
    let set = DenseSet::new(std::slice::from_ref(&w), SHARDS)?;
    let (w0, e0) = exact(&shards, &set).await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (mut dense_sum, mut rows_sum) = (vec![0.0f64; W_LEN], vec![0.0f64; KEYS as usize * E_DIM]);
    // Sums of magnitudes, for the float tolerance.
    let (mut dense_abs, mut rows_abs) = (vec![0.0f64; W_LEN], vec![0.0f64; KEYS as usize * E_DIM]);
    for clock in 0..15 {
        // Heavy-tailed gradients: a few large values among many small ones.
        let g: Vec<f32> = (0..W_LEN).map(|_| rng.random_range(-1.0f32..1.0).powi(5) * 10.0).collect();
        // Every other gradient as the trainer hands it over (encoded all the same).
        match clock % 2 {
            0 => c.push_dense(&set, &g, clock, clock, false).await?,
            _ => c.push_dense(&set, &SharedF32::new(g.clone()), clock, clock, false).await?,
        }
        let keys: Vec<u64> = (0..30).map(|_| rng.random_range(0..KEYS)).collect();
        let rows: Vec<f32> = (0..keys.len() * E_DIM).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        c.push_sparse(E, E_DIM, &keys, &rows, clock, clock, false).await?;
        for (i, g) in g.iter().enumerate() {
            dense_sum[i] += f64::from(*g);
            dense_abs[i] += f64::from(g.abs());
        }
        for (&k, r) in keys.iter().zip(rows.chunks(E_DIM)) {
            for (j, v) in r.iter().enumerate() {
                rows_sum[k as usize * E_DIM + j] += f64::from(*v);
                rows_abs[k as usize * E_DIM + j] += f64::from(v.abs());
            }
        }
    }
    let (w1, e1) = exact(&shards, &set).await?;
    let dense_res = c.dense_residual(&set);
    let keys: Vec<u64> = (0..KEYS).collect();
    let rows_res = c.sparse_residual(E, &keys, E_DIM);
    let mut lossy = false;
    for (what, before, after, residual, sum, abs) in [
        ("dense", &w0, &w1, &dense_res, &dense_sum, &dense_abs),
        ("sparse", &e0, &e1, &rows_res, &rows_sum, &rows_abs),
    ] {
        for i in 0..sum.len() {
            // f32 rounding of the shard's updates and of the residual.
            let tolerance = 1e-5 * (2.0 + f64::from(before[i].abs()) + abs[i]);
            let applied = f64::from(before[i]) - f64::from(after[i]);
            let total = applied + f64::from(residual[i]);
            ensure!(
                (total - sum[i]).abs() <= tolerance,
                "{codec} {what} element {i}: applied {applied} + residual {} != {}",
                residual[i],
                sum[i]
            );
            lossy |= residual[i] != 0.0;
        }
    }
    ensure!(lossy, "{codec}: no residual at all, so the test proves nothing");
    shards.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_feedback_delivers_every_gradient_through_each_lossy_codec() {
    for codec in [
        Codec::F16,
        Codec::Bf16,
        Codec::Int8 { stochastic: false },
        Codec::Int8 { stochastic: true },
        Codec::TopK { ratio: 0.05 },
    ] {
        check_feedback_conserves(codec).await.unwrap_or_else(|e| panic!("{codec}: {e:#}"));
    }
}

/// Without error feedback, top-k simply drops what it does not send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_error_feedback_top_k_loses_gradient() -> Result<()> {
    let shards = LocalShards::start(SHARDS).await?;
    let (w, _) = tables(Codecs { push: Codec::TopK { ratio: 0.1 }, pull: Codec::F32 });
    let mut c = sharded_client(&shards, 1).await;
    c.set_error_feedback(false);
    c.register(&w).await?;
    let set = DenseSet::new(std::slice::from_ref(&w), SHARDS)?;
    let w0 = exact_dense(&shards, &set).await?;
    let g: Vec<f32> = (0..W_LEN).map(|i| 1.0 + i as f32 / W_LEN as f32).collect();
    c.push_dense(&set, &g, 0, 0, false).await?;
    let w1 = exact_dense(&shards, &set).await?;
    let moved = w0.iter().zip(&w1).filter(|(a, b)| a != b).count();
    // One block of at most 128 values per chunk keeps ceil(0.1 * len).
    let kept: usize = (0..W_LEN.div_ceil(W_CHUNK))
        .map(|i| compress::top_k_count(0.1, chunk_range(W_LEN, W_CHUNK, i).len()))
        .sum();
    assert_eq!(moved, kept);
    assert!(c.dense_residual(&set).iter().all(|&r| r == 0.0), "no residual is kept");
    shards.stop().await?;
    Ok(())
}

/// A raw push to `W`'s chunk `index` on its shard, gradients `bytes`, codec
/// fingerprint `codecs`, as worker 9 with `seq`.
fn raw_push(index: u32, bytes: Vec<u8>, codecs: u64, seq: u64) -> pb::PushDenseRequest {
    pb::PushDenseRequest {
        chunks: vec![pb::DenseChunk { tensor: W.into(), index, values: bytes.into() }],
        meta: Some(pb::PushMeta { worker: 9, seq, codecs, ..Default::default() }),
    }
}

fn int8(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    compress::encode(Codec::Int8 { stochastic: false }, values, values.len(), 0, &mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_refuse_other_codecs_and_hostile_encodings() -> Result<()> {
    let shards = LocalShards::start(SHARDS).await?;
    let codecs = Codecs { push: Codec::Int8 { stochastic: false }, pull: Codec::F16 };
    let (w, _) = tables(codecs);
    let c = sharded_client(&shards, 1).await;
    c.register(&w).await?;
    let set = DenseSet::new(std::slice::from_ref(&w), SHARDS)?;
    // Agreed at registration: the same table with other codecs is a conflict.
    let (mut other, _) = tables(Codecs { push: Codec::F16, pull: Codec::F16 });
    let refused = c.register(&other).await.expect_err("other codecs");
    assert!(refused.to_string().contains("different spec"), "{refused}");
    other.codecs.push = Codec::Int8 { stochastic: true };
    assert!(c.register(&other).await.is_err(), "int8 with stochastic rounding is another spec too");

    let index = 0;
    let shard = chunk_shard(W, index, SHARDS) as usize;
    let len = chunk_range(W_LEN, W_CHUNK, 0).len();
    let mut raw = raw_client(&shards.addrs[shard]).await;
    let good = int8(&vec![0.5; len]);
    let int8_tag = compress::codecs_tag([CodecKind::Int8]);
    let fp16_tag = compress::codecs_tag([CodecKind::F16]);
    let twice = compress::codecs_tag([CodecKind::Int8; 2]);
    let mut nan_scale = good.clone();
    nan_scale[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let cases: Vec<(&str, pb::PushDenseRequest, &str)> = vec![
        (
            "f32 bytes to an int8 table",
            raw_push(index, vec![0; 4 * len], 0, 1),
            "(`w` int8); the push says f32",
        ),
        (
            "fp16 to an int8 table",
            raw_push(index, vec![0; 2 * len], fp16_tag, 1),
            "the push says fingerprint",
        ),
        ("int8 one byte short", raw_push(index, good[1..].to_vec(), int8_tag, 1), "gradient (int8)"),
        ("int8 with a NaN scale", raw_push(index, nan_scale, int8_tag, 1), "scale NaN"),
        ("two int8 blocks for one chunk", raw_push(index, good.clone(), twice, 1), "fingerprint"),
    ];
    let before = exact_dense(&shards, &set).await?;
    for (what, req, fragment) in cases {
        let status = raw.push_dense(req).await.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(status.message().contains(fragment), "{what}: {}", status.message());
    }
    let after = exact_dense(&shards, &set).await?;
    assert_eq!(before, after, "refused pushes change nothing");

    // The good push, replayed: applied once (the refusals did not use seq 1).
    let req = raw_push(index, good, int8_tag, 1);
    assert!(!raw.push_dense(req.clone()).await?.into_inner().duplicate);
    assert!(raw.push_dense(req).await?.into_inner().duplicate, "a replayed compressed push is a duplicate");
    let after = exact_dense(&shards, &set).await?;
    for i in 0..W_LEN {
        let expected = if i < len { before[i] - 0.5 } else { before[i] };
        assert!((after[i] - expected).abs() < 1e-6, "element {i}: {} vs {expected}", after[i]);
    }
    shards.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_k_indices_and_sparse_row_scales_are_checked() -> Result<()> {
    let shards = LocalShards::start(1).await?;
    let (w, mut e) = tables(Codecs { push: Codec::TopK { ratio: 0.5 }, pull: Codec::F32 });
    e.codecs.push = Codec::Int8 { stochastic: false };
    let c = ShardedClient::connect(&shards.addrs, 1, Default::default()).await?;
    c.register(&w).await?;
    c.register(&e).await?;
    let mut raw = raw_client(&shards.addrs[0]).await;
    let top_k = compress::codecs_tag([CodecKind::TopK]);
    let words = |w: &[u32]| w.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let one = 1.0f32.to_bits();
    for (bytes, fragment) in [
        (words(&[1, 128, one]), "index 128"),
        (words(&[2, 3, 3, one, one]), "index 3"),
        (words(&[129]), "129 values sent of a block of 128"),
    ] {
        let status = raw.push_dense(raw_push(0, bytes, top_k, 1)).await.expect_err(fragment);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains(fragment), "{}", status.message());
    }
    // Sparse int8: one scale per row, so 2 rows of 4 take 2 * (4 + 4) bytes.
    let keys = ps_common::codec::encode_u64(&[1, 2]);
    let push = |grads: Vec<u8>| pb::PushSparseRequest {
        table: E.into(),
        keys: keys.clone(),
        grads: grads.into(),
        meta: Some(pb::PushMeta {
            worker: 9,
            seq: 1,
            codecs: compress::codecs_tag([CodecKind::Int8]),
            ..Default::default()
        }),
    };
    let status = raw.push_sparse(push(vec![0; 12])).await.expect_err("one scale for two rows");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("12 bytes, expected 16 for 8 values"), "{}", status.message());
    let mut rows = Vec::new();
    compress::encode(
        Codec::Int8 { stochastic: false },
        &[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -2.0],
        E_DIM,
        0,
        &mut rows,
    );
    assert_eq!(raw.push_sparse(push(rows)).await?.into_inner().applied, 2);
    shards.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_are_compressed_only_for_registered_training_reads() -> Result<()> {
    let shards = LocalShards::start(SHARDS).await?;
    let (w, e) = tables(Codecs { push: Codec::F32, pull: Codec::Bf16 });
    let trainer = sharded_client(&shards, 1).await;
    trainer.register(&w).await?;
    trainer.register(&e).await?;
    let set = DenseSet::new(std::slice::from_ref(&w), SHARDS)?;
    let (exact_w, exact_e) = exact(&shards, &set).await?;
    let mut got = vec![0.0; W_LEN];
    trainer.pull_dense(&set, 0, &mut got).await?;
    let (_, trainer_dense) = trainer.wire_bytes();
    let keys: Vec<u64> = (0..KEYS).collect();
    let mut rows = vec![0.0; keys.len() * E_DIM];
    trainer.pull_sparse(E, E_DIM, &keys, 0, &mut rows).await?;
    let bf16 = |v: &[f32]| {
        let mut bytes = Vec::new();
        compress::encode(Codec::Bf16, v, 1, 0, &mut bytes);
        compress::decode(CodecKind::Bf16, "v", &bytes, v.len(), 1).unwrap()
    };
    assert_eq!(got, bf16(&exact_w), "training pulls arrive in bf16");
    assert_eq!(rows, bf16(&exact_e));
    assert_ne!(got, exact_w, "and bf16 is not f32 here");
    // Evaluation lookups read exact rows even on the training client.
    trainer.lookup_sparse(E, E_DIM, &keys, 0, &mut rows).await?;
    assert_eq!(rows, exact_e);
    // Half the value bytes (each answer also carries names and indices).
    let reader = sharded_client(&shards, 0).await;
    reader.pull_dense(&set, 0, &mut got).await?;
    let (_, exact_dense) = reader.wire_bytes();
    ensure!(exact_dense > 4 * W_LEN as u64, "an f32 pull carries its values: {exact_dense}");
    ensure!(
        (trainer_dense as f64) < 0.6 * exact_dense as f64,
        "bf16 pulls: {trainer_dense} B vs f32 {exact_dense} B"
    );
    shards.stop().await?;
    Ok(())
}
