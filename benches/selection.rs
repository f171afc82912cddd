//! Token selection cost: one pick from pools of 10, 1 000 and 100 000
//! tokens with 10% of them cooling down (so picks rotate through
//! unavailable tokens), from one thread and from two threads at once.

use std::hint::black_box;
use std::sync::Arc;
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
        group.bench_with_input(BenchmarkId::new("2 threads", size), &shared, |b, p| {
            // Both threads pick `iters` times at once; the figure is the
            // wall time per pick of one thread while the other competes.
            b.iter_custom(|iters| {
                let start = Instant::now();
                let other = {
                    let p = Arc::clone(p);
                    std::thread::spawn(move || {
                        for _ in 0..iters {
                            black_box(p.select(&[]));
                        }
                    })
                };
                for _ in 0..iters {
                    black_box(p.select(&[]));
                }
                other.join().expect("picker thread");
                start.elapsed()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, selection);
criterion_main!(benches);
