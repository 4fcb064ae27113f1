//! Would shared memory move a shard's frames more cheaply than its Unix
//! socket? A round trip of `n` bytes each way (default 110,000: one shard's
//! part of the reference model's push, and of the pull that answers it)
//! between two threads, three ways, each with both threads on one CPU and on
//! two CPUs:
//!
//! - `socket`: the bytes through a Unix socket pair, as the data plane
//!   sends them (the kernel copies them in and out);
//! - `shared`: the bytes copied into a buffer both threads share and out of
//!   it again, with a one-byte message on a Unix socket pair to say so (what
//!   a shared-memory ring with a doorbell would do, at best);
//! - `memcpy`: one thread copying the same bytes twice each way, for scale.
//!
//! Wall time and CPU time (user + system, both threads) per round trip.
//!
//! ```text
//! cargo run --release --example shm_vs_socket -- [n] [reps]
//! ```

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::resource::{UsageWho, getrusage};

/// CPU time of this process so far.
fn cpu() -> Duration {
    let usage = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
    let time = |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    time(usage.user_time()) + time(usage.system_time())
}

/// Runs the calling thread on `cpu` only, if it can.
fn pin(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// One way of moving `n` bytes to the other thread and back.
#[derive(Clone, Copy)]
enum Way {
    Socket,
    Shared,
}

/// Wall and CPU time per round trip of `n` bytes each way, `reps` times,
/// the answering thread on `cpus.1` and this one on `cpus.0`.
fn round_trips(way: Way, n: usize, reps: usize, cpus: (usize, usize)) -> (Duration, Duration) {
    let (mut near, mut far) = UnixStream::pair().expect("socket pair");
    // [to the far thread, back from it]
    let shared = Arc::new([Mutex::new(vec![0u8; n]), Mutex::new(vec![0u8; n])]);
    let theirs = Arc::clone(&shared);
    let answerer = std::thread::spawn(move || {
        pin(cpus.1);
        let mut buf = vec![0u8; n];
        let mut bell = [0u8; 1];
        for _ in 0..reps + 1 {
            match way {
                Way::Socket => {
                    far.read_exact(&mut buf).expect("read");
                    far.write_all(&buf).expect("write");
                }
                Way::Shared => {
                    far.read_exact(&mut bell).expect("read");
                    buf.copy_from_slice(&theirs[0].lock().expect("lock"));
                    theirs[1].lock().expect("lock").copy_from_slice(&buf);
                    far.write_all(&bell).expect("write");
                }
            }
        }
    });
    pin(cpus.0);
    let mut buf = vec![1u8; n];
    let mut bell = [0u8; 1];
    let mut once = |buf: &mut Vec<u8>| match way {
        Way::Socket => {
            near.write_all(buf).expect("write");
            near.read_exact(buf).expect("read");
        }
        Way::Shared => {
            shared[0].lock().expect("lock").copy_from_slice(buf);
            near.write_all(&bell).expect("write");
            near.read_exact(&mut bell).expect("read");
            buf.copy_from_slice(&shared[1].lock().expect("lock"));
        }
    };
    // The first round trip grows the socket's buffers: not timed.
    once(&mut buf);
    let (t0, c0) = (Instant::now(), cpu());
    for _ in 0..reps {
        once(&mut buf);
    }
    let (wall, used) = (t0.elapsed(), cpu() - c0);
    answerer.join().expect("answering thread");
    (wall / reps as u32, used / reps as u32)
}

/// Time per "round trip" of one thread copying `n` bytes four times (each
/// way's copy in and copy out).
fn memcpy(n: usize, reps: usize) -> Duration {
    let (mut a, mut b) = (vec![1u8; n], vec![0u8; n]);
    let t0 = Instant::now();
    for _ in 0..reps {
        b.copy_from_slice(&a);
        a.copy_from_slice(&b);
        b.copy_from_slice(&a);
        a.copy_from_slice(&b);
        std::hint::black_box((&a, &b));
    }
    t0.elapsed() / reps as u32
}

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let n = args.next().and_then(Result::ok).unwrap_or(110_000).max(1);
    let reps = args.next().and_then(Result::ok).unwrap_or(5_000).max(1);
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get());
    println!("{n} bytes each way, {reps} round trips; {cpus} CPU(s)");
    println!("{:<42} {:>12} {:>12}", "", "wall us", "CPU us");
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mut layouts = vec![("one CPU", (0, 0))];
    if cpus > 1 {
        layouts.push(("two CPUs", (0, 1)));
    }
    for (label, layout) in layouts {
        for (name, way) in [("Unix socket", Way::Socket), ("shared buffer + 1-byte message", Way::Shared)] {
            let (wall, used) = round_trips(way, n, reps, layout);
            println!("{:<42} {:>12.1} {:>12.1}", format!("{name}, {label}"), us(wall), us(used));
        }
    }
    println!("{:<42} {:>12.1}", "memcpy of the same bytes (x4)", us(memcpy(n, reps)));
}
