//! Token selection cost: one pick from pools of 10, 1 000 and 100 000
//! tokens with 10% of them cooling down (so picks rotate through
//! unavailable tokens), from one thread and from two threads at once.

use std::hint::black_box;
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tokenpool::config::{Config, Secret, Tier, TokenConfig, TokenOrigin};
use tokenpool::pool::{Outcome, Pool};

fn pool(size: usize) -> Pool {
    let defaults = Config::parse("", None, &|_| None).expect("defaults are valid");
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

fn selection(c: &mut Criterion) {
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
