//! Scheduler decision time: 100 nodes × 20 models, as `cargo bench --bench
//! scheduler`. Prints p50/p99 of one `Router::route` call; asserts nothing.

use std::hint::black_box;
use std::time::Instant;

use _core::scheduler::{NodeState, Router};

const NODES: usize = 100;
const MODELS_PER_NODE: usize = 20;
/// 40 distinct models, so each is held by about half of the nodes.
const MODEL_POOL: usize = 40;
const CALLS: usize = 200_000;

fn main() {
    let mut router = Router::new("node-0", 3_000);
    for n in 0..NODES {
        let models: Vec<String> = (0..MODELS_PER_NODE)
            .map(|k| format!("model-{}:7b", (n + k * 2) % MODEL_POOL))
            .collect();
        let loaded: Vec<String> = models.iter().take(2).cloned().collect();
        // a third of the nodes have both loaded models busy: loading another evicts one
        let busy = loaded.iter().take(n % 3).cloned().collect();
        router.update(NodeState {
            id: format!("node-{n}"),
            alive: n % 17 != 5,
            advert_at_ms: 1_000,
            models,
            loaded,
            busy,
            max_loaded: 2,
            in_flight: (n * 7 % 5) as u32,
            queue_depth: (n % 3) as u32,
            max_queue: 8,
        });
    }
    let names: Vec<String> = (0..MODEL_POOL).map(|m| format!("model-{m}:7b")).collect();
    // warm up
    for i in 0..10_000 {
        black_box(router.route(&names[i % MODEL_POOL], 2_000).ok());
    }
    let mut times = Vec::with_capacity(CALLS);
    for i in 0..CALLS {
        let m = &names[i % MODEL_POOL];
        let t = Instant::now();
        let r = router.route(black_box(m), 2_000);
        times.push(t.elapsed().as_nanos() as u64);
        black_box(r.ok());
    }
    times.sort_unstable();
    let p = |q: f64| times[((times.len() as f64 - 1.0) * q) as usize] as f64 / 1000.0;
    let candidates = router.route(&names[0], 2_000).map(|v| v.len()).unwrap_or(0);
    println!(
        "scheduler route(): {NODES} nodes x {MODELS_PER_NODE} models ({candidates} candidates), {CALLS} calls: \
         p50 {:.2} us, p90 {:.2} us, p99 {:.2} us (target p50 <= 5 us)",
        p(0.5),
        p(0.9),
        p(0.99)
    );
}
