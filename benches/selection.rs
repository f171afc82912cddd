//! Token selection cost: one pick from pools of 10, 1 000 and 100 000
//! tokens with 10% of them cooling down (so picks rotate through
//! unavailable tokens), from one thread and from two threads at once;
//! `most_remaining` (every token's remaining quota known and different)
//! and session affinity (rendezvous hashing) at the same sizes. Before the
//! benchmarks it prints how many sessions move when a token rests or
//! leaves.

use std::hint::black_box;
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tokenpool::config::{Config, Secret, Tier, TokenConfig, TokenOrigin};
use tokenpool::pool::{session_key, Outcome, Pool, Quota};

fn pool(size: usize) -> Pool {
    pool_with(size, "")
}

fn pool_with(size: usize, section: &str) -> Pool {
    let defaults = Config::parse(&format!("[pool]\n{section}"), None, &|_| None)
        .expect("the settings are valid");
    let tokens: Vec<TokenConfig> = (0..size)
        .map(|i| TokenConfig {
            name: format!("t{i}"),
            tier: Tier::Personal,
            secret: Secret::new(format!("secret-{i}")),
            origin: TokenOrigin::File,
        })
        .collect();
    let pool = Pool::new(&defaults.pool, &tokens, false, None);
    // Every tenth token rests for an hour: picks must step over them.
    for token in pool.tokens().iter().step_by(10) {
        token.report(
            Outcome::RateLimited(Some(Duration::from_secs(3600))),
            pool.settings(),
        );
    }
    pool
}

/// A `most_remaining` pool whose every token has a known, different
/// remaining count (the worst case: no early stop on an unknown count).
fn pool_by_quota(size: usize) -> Pool {
    let pool = pool_with(size, "strategy = \"most_remaining\"");
    for (i, token) in pool.tokens().iter().enumerate() {
        token.learn_quota(Quota {
            limit: Some(1_000_000),
            remaining: Some((i as u64 * 7919) % 1_000_000),
            ..Quota::default()
        });
    }
    pool
}

/// Sessions placed on each token, and how many move when one token rests
/// or leaves.
fn affinity_movement(tokens: usize, sessions: usize) {
    let p = pool_with(tokens, "");
    for token in p.tokens() {
        token.report(Outcome::Success, p.settings());
    }
    // `pool_with` rests every tenth token: bring them back.
    for token in p.tokens().iter().step_by(10) {
        token.enable();
    }
    let keys: Vec<u64> = (0..sessions)
        .map(|i| session_key(format!("session-{i}").as_bytes()))
        .collect();
    let place = |p: &Pool| -> Vec<String> {
        keys.iter()
            .map(|&k| p.select_for(&[], Some(k)).unwrap().token.name().to_string())
            .collect()
    };
    let before = place(&p);
    let victim = before[0].clone();
    let on_victim = before.iter().filter(|t| **t == victim).count();
    p.get(&victim).unwrap().report(
        Outcome::RateLimited(Some(Duration::from_secs(3600))),
        p.settings(),
    );
    let after = place(&p);
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    let others_moved = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| b != a && **b != victim)
        .count();
    let max = {
        let mut counts = std::collections::HashMap::new();
        for t in &before {
            *counts.entry(t).or_insert(0) += 1;
        }
        counts.values().copied().max().unwrap_or(0)
    };
    println!(
        "affinity: {sessions} sessions over {tokens} tokens (at most {max} on one token); \
         one token rests: {moved} sessions moved ({on_victim} were on it, {others_moved} others)"
    );
}

fn selection(c: &mut Criterion) {
    affinity_movement(4, 16);
    affinity_movement(100, 10_000);
    let mut group = c.benchmark_group("select");
    group.throughput(Throughput::Elements(1));
    for size in [10usize, 1_000, 100_000] {
        let p = pool(size);
        group.bench_with_input(BenchmarkId::new("1 thread", size), &p, |b, p| {
            b.iter(|| black_box(p.select(&[])))
        });
        let shared = Arc::new(pool(size));
        let helper = Helper::start(Arc::clone(&shared));
        group.bench_with_input(BenchmarkId::new("2 threads", size), &shared, |b, p| {
            // Both threads pick `iters` times at once; the figure is the
            // wall time per pick of this thread while the other competes.
            // The other thread lives as long as the benchmark, like a
            // runtime's worker thread.
            b.iter_custom(|iters| {
                helper.go(iters);
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(p.select(&[]));
                }
                let elapsed = start.elapsed();
                helper.wait();
                elapsed
            })
        });
    }
    for size in [10usize, 1_000, 100_000] {
        let p = pool_by_quota(size);
        group.bench_with_input(BenchmarkId::new("most_remaining", size), &p, |b, p| {
            b.iter(|| black_box(p.select(&[])))
        });
        let p = pool(size);
        let mut session = 0u64;
        group.bench_with_input(BenchmarkId::new("affinity", size), &p, |b, p| {
            b.iter(|| {
                session = session.wrapping_add(1);
                black_box(p.select_for(&[], Some(session_key(&session.to_le_bytes()))))
            })
        });
    }
    group.finish();
}

/// A thread that picks from a pool on request, for as long as it lives.
struct Helper {
    go: mpsc::Sender<u64>,
    start: Arc<Barrier>,
    done: mpsc::Receiver<()>,
}

impl Helper {
    fn start(pool: Arc<Pool>) -> Helper {
        let (go, jobs) = mpsc::channel::<u64>();
        let (finished, done) = mpsc::channel();
        let start = Arc::new(Barrier::new(2));
        let barrier = Arc::clone(&start);
        std::thread::spawn(move || {
            for iters in jobs {
                barrier.wait();
                for _ in 0..iters {
                    black_box(pool.select(&[]));
                }
                let _ = finished.send(());
            }
        });
        Helper { go, start, done }
    }

    /// Starts `iters` picks on the helper, at the same moment as the caller's.
    fn go(&self, iters: u64) {
        self.go.send(iters).expect("helper thread");
        self.start.wait();
    }

    fn wait(&self) {
        self.done.recv().expect("helper thread");
    }
}

criterion_group!(benches, selection);
criterion_main!(benches);
