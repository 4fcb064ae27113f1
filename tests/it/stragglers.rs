//! Straggler remedies against real shards on loopback: the data queue under
//! a worker that dies, backup workers under BSP, and DC-ASGD's update.

use std::collections::BTreeMap;
use std::time::Duration;

use ps_common::optim::{DelayCompensation, Rule};
use ps_common::spec::{Backup, Consistency, Init, InitKind, LateGradients, OptimizerConfig, TableSpec};
use ps_common::wire::pb;
use ps_server::local::LocalShards;
use ps_worker::client::{DataRange, DenseSet, ShardedClient};

use crate::util::sharded_client;

const LEASE: Duration = Duration::from_millis(300);

/// Three workers drain a queue of 2 epochs x 50 batches in ranges of 4;
/// worker 2 takes a range, completes nothing and dies (no leave, no
/// heartbeat). Its range is handed to another worker once its lease runs
/// out, and every range of the plan is completed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_data_range_is_completed_once_when_a_worker_dies() {
    let shards = LocalShards::start(2).await.expect("start shards");
    let plan = pb::DataPlan { epochs: 2, batches_per_epoch: 50, range_batches: 4 };
    let mut clients = Vec::new();
    for w in 0..3 {
        let mut c = sharded_client(&shards, w).await;
        c.join(Consistency::Asp, LEASE, 0).await.unwrap();
        clients.push(c);
    }
    let heartbeats: Vec<_> = clients[..2].iter().map(|c| c.spawn_heartbeat(LEASE / 4)).collect();
    let dying = clients[2].take_range(plan, &[], LEASE).await.unwrap().range.expect("a range");

    // Workers 0 and 1 take turns, each "training" its range for 5 ms.
    let mut completed: BTreeMap<(u32, u64), Vec<u64>> = BTreeMap::new();
    let mut held: [Option<DataRange>; 2] = [None, None];
    let mut finished = false;
    for _round in 0..2000 {
        for w in 0..2 {
            let done: Vec<DataRange> = held[w].take().into_iter().collect();
            for r in &done {
                completed.entry((r.epoch, r.start)).or_default().push(w as u64);
            }
            let taken = clients[w].take_range(plan, &done, LEASE).await.unwrap();
            held[w] = taken.range;
            finished |= taken.finished;
        }
        if finished {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(finished, "the queue never finished");
    let total = 2 * 50u64.div_ceil(4);
    assert_eq!(completed.len() as u64, total, "every range completed: {completed:?}");
    assert!(completed.values().all(|by| by.len() == 1), "each exactly once: {completed:?}");
    assert!(completed.contains_key(&(dying.epoch, dying.start)), "the dead worker's range was redone");
    let stats = clients[0].stats().await.unwrap();
    let q = stats[0].data_queue.expect("shard 0 holds the queue");
    assert_eq!((q.completed, q.total, q.reassigned), (total, total, 1));
    assert!(stats[1].data_queue.is_none(), "only the shard asked holds a queue");

    // The dead worker comes back and reports its old range: nothing counts twice.
    let late = clients[2].take_range(plan, &[dying], LEASE).await.unwrap();
    assert!(late.finished && late.range.is_none() && late.completed == total, "{late:?}");
    for h in heartbeats {
        h.abort();
    }
    shards.stop().await.expect("stop shards");
}

/// A 4-float dense table on one shard, read and written by `clients`.
async fn dense_table(
    shards: &LocalShards,
    optimizer: OptimizerConfig,
    workers: u64,
) -> (Vec<ShardedClient>, DenseSet) {
    let init = Init { kind: InitKind::Constant { value: 0.5 }, seed: 0 };
    let spec = TableSpec::dense("w", &[4], init, optimizer);
    let set = DenseSet::new(std::slice::from_ref(&spec), shards.addrs.len() as u32).unwrap();
    let mut clients = Vec::new();
    for w in 0..workers {
        let c = sharded_client(shards, w).await;
        c.register(&spec).await.unwrap();
        clients.push(c);
    }
    (clients, set)
}

/// BSP with one backup worker among three: workers 0 and 1 run 20
/// iterations while worker 2 never pushes, and no read waits for it (the
/// shard's longest wait is 120 s; each read must be served within 5 s).
/// Worker 2's push of iteration 0 then comes late: it is dropped (the
/// parameters do not move), counted, and worker 2 jumps to clock 20.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_worker_iterations_never_wait_for_the_slowest() {
    let shards = LocalShards::start(1).await.expect("start shards");
    let (mut clients, set) = dense_table(&shards, Rule::sgd(0.1).into(), 3).await;
    for c in &mut clients {
        c.set_backup(Backup { workers: 1, late: LateGradients::Drop });
        c.join(Consistency::Bsp, Duration::from_secs(30), 0).await.unwrap();
    }
    let mut params = vec![0.0f32; set.len()];
    let grad = vec![1.0f32; set.len()];
    for t in 0..20 {
        for c in clients.iter_mut().take(2) {
            let read = tokio::time::timeout(Duration::from_secs(5), c.pull_dense(&set, t, &mut params)).await;
            read.expect("a read waited for the backup worker").unwrap();
            c.push_dense(&set, &grad, t, t, true).await.unwrap();
        }
    }
    clients[0].pull_dense(&set, 20, &mut params).await.unwrap();
    let before = params.clone();
    let slow = &mut clients[2];
    slow.push_dense(&set, &grad, 0, 0, true).await.unwrap();
    assert_eq!(slow.take_clock(), 20, "the late worker jumps to the others' iteration");
    assert_eq!(slow.late_pushes(), 1);
    slow.pull_dense(&set, 20, &mut params).await.unwrap();
    assert_eq!(params, before, "a dropped push changes nothing");
    // 40 on-time pushes of 1.0 at lr 0.1 from 0.5.
    assert!(params.iter().all(|&p| (p - (0.5 - 40.0 * 0.1)).abs() < 1e-5), "{params:?}");
    let stats = clients[0].stats().await.unwrap();
    assert_eq!((stats[0].late_dropped, stats[0].backup_workers), (1, 1));
    shards.stop().await.expect("stop shards");
}

/// DC-ASGD through the shards: worker 1 reads, worker 0 reads, pushes and
/// so moves the parameters; worker 1's gradient, computed on its older
/// read, is then compensated by lambda * g * g * (w_now - w_read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_compensated_update_matches_the_formula() {
    let shards = LocalShards::start(2).await.expect("start shards");
    let dc = DelayCompensation { lambda: 0.5, adaptive: false, momentum: 0.95 };
    let optimizer = OptimizerConfig { delay_compensation: Some(dc), ..Rule::sgd(0.1).into() };
    let (mut clients, set) = dense_table(&shards, optimizer, 2).await;
    for c in &mut clients {
        c.join(Consistency::Asp, Duration::from_secs(30), 0).await.unwrap();
    }
    let mut read = vec![0.0f32; set.len()];
    clients[1].pull_dense(&set, 0, &mut read).await.unwrap();
    let mut scratch = vec![0.0f32; set.len()];
    clients[0].pull_dense(&set, 0, &mut scratch).await.unwrap();
    let g0 = [1.0f32, -2.0, 0.5, 0.0];
    clients[0].push_dense(&set, &g0, 0, 0, true).await.unwrap();
    let g1 = [0.5f32, 1.0, -1.0, 2.0];
    clients[1].push_dense(&set, &g1, 0, 0, true).await.unwrap();
    let mut now = vec![0.0f32; set.len()];
    clients[0].pull_dense(&set, 1, &mut now).await.unwrap();
    for i in 0..4 {
        // By hand: w0 = 0.5; worker 0's push is not delayed (it read w0):
        // w1 = w0 - 0.1 g0. Worker 1 read w0: g = g1 + 0.5 g1^2 (w1 - w0).
        let w0 = 0.5f64;
        let w1 = w0 - 0.1 * f64::from(g0[i]);
        let g = f64::from(g1[i]) + 0.5 * f64::from(g1[i]).powi(2) * (w1 - w0);
        let want = w1 - 0.1 * g;
        assert!((f64::from(now[i]) - want).abs() < 1e-6, "param {i}: {} vs {want}", now[i]);
    }
    assert_eq!(read, vec![0.5; 4]);
    shards.stop().await.expect("stop shards");
}

/// The launcher under dynamic data: worker 1 (slowed down) is SIGKILLed at
/// 3 s, holding a range; worker 0 takes it over once its lease runs out and
/// completes every range of every epoch exactly once (the queue's count),
/// so the whole data set is trained though a worker died.
#[test]
fn a_killed_worker_leaves_its_data_to_the_others() {
    let text = crate::cluster::run_file(
        "[784, 16, 10]",
        r#"epochs = 8
lease_ms = 1000
data = "dynamic"
range_batches = 4
consistency = { model = "bsp" }
straggler = { kind = "random", workers = [0, 1], probability = 1.0, mean_ms = 10.0 }"#,
    );
    let (ok, summary, stats, _) = crate::cluster::train_with_a_fault(&text, ["--kill-worker", "1:3"]);
    assert!(!ok, "the launcher reports the killed worker as a failure");
    let done = summary["done"].as_array().expect("done list");
    assert_eq!((done.len(), &done[0]["worker"]), (1, &serde_json::json!(0)), "{summary}");
    let queue = &stats["shards"][0]["stragglers"];
    // 4000 rows, batches of 32: 125 batches, 32 ranges of 4 per epoch.
    assert_eq!(queue["data_total"], 8 * 32, "{stats}");
    assert_eq!(queue["data_completed"], queue["data_total"], "every range completed: {stats}");
    assert_eq!(queue["data_reassigned"], 1, "the dead worker's range was handed over: {stats}");
    // Worker 0 trained what worker 1 did not: together every sample once,
    // plus the batches of the range worker 1 died in.
    let samples = done[0]["samples"].as_u64().unwrap_or(0);
    assert!(samples < 8 * 4000 && samples > 4000, "worker 0 trained {samples} samples");
}
