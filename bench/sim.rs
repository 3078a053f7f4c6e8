//! The membership simulation's table (ARCHITECTURE.md, "Scaling"): the real
//! SWIM + advert code (`membership::swim`) and the real scheduler router,
//! driven by a simulated network (`membership::sim`) with virtual time,
//! seeded latency, loss and partitions.
//!
//!     cargo run --release --example sim                # the whole table
//!     cargo run --release --example sim -- main 1000 600 [seed]
//!     cargo run --release --example sim -- partition 1000 [seed]
//!
//! It prints figures and asserts nothing (a bench, not a test; the tests
//! are in rust/membership/sim.rs).

use std::collections::HashMap;
use std::time::Instant;

use _core::membership::sim::{Net, Sim};
use _core::membership::swim::{SwimConfig, SwimEvent};
use _core::scheduler::{NodeState, Router};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// The advert each simulated node publishes: about the size a compact
/// binary advert of the real node would be (models as indexes into the
/// catalogue, loaded ones, load counters).
#[derive(Serialize, Deserialize)]
struct Load {
    models: u32,
    loaded: u32,
    in_flight: u16,
    queue: u16,
    max_queue: u16,
}

const MODELS: u32 = 32;
const STALE_AFTER_MS: u64 = 3_000;

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// CPU seconds this process used (user + system), from /proc/self/stat:
/// on a shared machine the wall time says more about the neighbours.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // fields after the command name (which may hold spaces) start at state
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after ')';
    // the kernel counts them in USER_HZ, 100 on Linux
    (ticks(11) + ticks(12)) / 100.0
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn row(name: &str, value: String, target: &str) {
    println!("| {name:<52} | {value:>26} | {target:<18} |");
}

fn header(title: &str) {
    println!("\n{title}\n");
    println!("| {:<52} | {:>26} | {:<18} |", "measure", "value", "target");
    println!("|{}|{}|{}|", "-".repeat(54), "-".repeat(28), "-".repeat(20));
}

/// Time (ms after `from`) by which `share` of `of` nodes had seen it.
fn reach(times: &HashMap<u32, u64>, of: usize, share: f64, from: u64) -> Option<u64> {
    let need = ((of as f64) * share).ceil() as usize;
    let mut t: Vec<u64> = times.values().copied().collect();
    t.sort_unstable();
    (need > 0 && t.len() >= need).then(|| t[need - 1] - from)
}

fn fmt_ms(v: Option<u64>) -> String {
    v.map_or("never".into(), |ms| format!("{:.2} s", ms as f64 / 1000.0))
}

struct Watch {
    joiner: u32,
    joined: HashMap<u32, u64>,
    victim: u32,
    downed: HashMap<u32, u64>,
    wide: Option<(u32, u64, u64)>, // origin, version, published at
    wide_reach: Vec<HashMap<u32, u64>>,
    wide_published: Vec<(u64, u32)>, // when, origin
    false_downs: u64,
    rejoins: u64,
}

fn main_run(n: u32, secs: u64, seed: u64, loss: f64) {
    let cfg = SwimConfig::for_cluster(n);
    let net = Net {
        latency_ms: (1, 10),
        loss,
    };
    let mut sim = Sim::new(n, cfg.clone(), net, seed);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xadc0);
    let load_before = loadavg();
    let wall = Instant::now();
    let cpu_before = cpu_secs();

    let joiner = n - 1;
    let victim = rng.gen_range(1..joiner);
    let mut models: Vec<u32> = (0..n)
        .map(|_| {
            let mut m = 0u32;
            while m.count_ones() < 4 {
                m |= 1 << rng.gen_range(0..MODELS);
            }
            m
        })
        .collect();
    sim.start_converged(0..joiner);
    let mut w = Watch {
        joiner,
        joined: HashMap::new(),
        victim,
        downed: HashMap::new(),
        wide: None,
        wide_reach: Vec::new(),
        wide_published: Vec::new(),
        false_downs: 0,
        rejoins: 0,
    };
    let (join_at, kill_at, steady_from) = (5_000u64, 20_000u64, 30_000u64);
    let mut steady_traffic = None;
    let end = secs * 1000;
    let mut t = 0;
    while t < end {
        // every node publishes its load each second (pushes carry it)
        for i in 0..n {
            if !sim.is_running(i) {
                continue;
            }
            let l = Load {
                models: models[i as usize],
                loaded: models[i as usize] & rng.gen::<u32>(),
                in_flight: rng.gen_range(0..8),
                queue: rng.gen_range(0..3),
                max_queue: 16,
            };
            let bytes = postcard::to_allocvec(&l).expect("encode");
            sim.publish(i, bytes, false);
        }
        // every 10 s one node changes the models it holds: a wide advert
        if t % 10_000 == 0 && t > 0 && t + 10_000 <= end {
            let o = rng.gen_range(0..joiner);
            if sim.is_running(o) {
                models[o as usize] ^= 1 << rng.gen_range(0..MODELS);
                let l = Load {
                    models: models[o as usize],
                    loaded: 0,
                    in_flight: 0,
                    queue: 0,
                    max_queue: 16,
                };
                let bytes = postcard::to_allocvec(&l).expect("encode");
                if let Some(v) = sim.publish(o, bytes, true) {
                    w.wide = Some((o, v, t));
                    w.wide_reach.push(HashMap::new());
                    w.wide_published.push((t, o));
                }
            }
        }
        if t == join_at {
            sim.start(joiner, 0);
            sim.join(joiner, 0);
        }
        if t == kill_at {
            sim.kill(victim);
        }
        if t == steady_from {
            steady_traffic = Some(sim.traffic());
        }
        let next = t + 1_000;
        let running: Vec<bool> = (0..n).map(|i| sim.is_running(i)).collect();
        sim.run_until(next, &mut |at, node, e| match e {
            SwimEvent::Up(id) if id.n == w.joiner => {
                w.joined.entry(node).or_insert(at);
            }
            SwimEvent::Down(id) => {
                if id.n == w.victim {
                    w.downed.entry(node).or_insert(at);
                } else if running[id.n as usize] {
                    w.false_downs += 1;
                }
            }
            SwimEvent::Rejoined(_) | SwimEvent::Defunct => w.rejoins += 1,
            SwimEvent::Advert(origin, v) => {
                if let Some((o, wv, _)) = w.wide {
                    if *origin == o && *v >= wv {
                        if let Some(r) = w.wide_reach.last_mut() {
                            r.entry(node).or_insert(at);
                        }
                    }
                }
            }
            _ => {}
        });
        t = next;
    }
    let wall_s = wall.elapsed().as_secs_f64();
    let cpu_s = cpu_secs() - cpu_before;
    let now = sim.now_ms;

    // freshness and honesty of ages, on a sample of nodes
    let running: Vec<u32> = (0..n).filter(|&i| sim.is_running(i)).collect();
    let mut fresh_share = Vec::new();
    let mut min_err = i64::MAX;
    let mut sum_over = 0f64;
    let mut aged = 0u64;
    for &i in running.iter().step_by((running.len() / 50).max(1)) {
        let Some(node) = sim.node(i) else { continue };
        let adverts = node.adverts();
        let fresh = adverts
            .iter()
            .filter(|(k, a)| {
                *k != i
                    && sim.is_running(*k)
                    && a.age_ms(now).is_some_and(|age| age <= STALE_AFTER_MS)
            })
            .count();
        fresh_share.push(fresh as f64 / (running.len() - 1) as f64);
        for (_, a) in &adverts {
            if let Some(age) = a.age_ms(now) {
                // every load advert was published at a whole second, and
                // its version is that instant (ms): the true age is known
                let truth = now.saturating_sub(a.version) as i64;
                let err = age as i64 - truth;
                min_err = min_err.min(err);
                sum_over += err as f64;
                aged += 1;
            }
        }
    }
    fresh_share.sort_by(|a, b| a.total_cmp(b));

    // the scheduler's decision on node 1's gossiped view
    let (usable, p50, p99, full_p50, full_p99) = decisions(&sim, 1, now);

    let traffic = sim.traffic();
    let steady = steady_traffic.unwrap_or_default();
    let steady_secs = (end.saturating_sub(steady_from)) as f64 / 1000.0;
    let per_node = |b: u64| b as f64 * 8.0 / 1000.0 / steady_secs / running.len() as f64;
    let swim_kbit = per_node(traffic.swim_bytes - steady.swim_bytes);
    let push_kbit = per_node(traffic.push_bytes - steady.push_bytes);

    header(&format!(
        "{n} nodes, {secs} virtual s, {:.0}% loss, latency 1-10 ms, seed {seed}",
        loss * 100.0
    ));
    let others = running.len() - 1;
    row(
        "join: known by 99.9% of nodes after",
        fmt_ms(reach(&w.joined, others, 0.999, join_at)),
        "<= 2 s",
    );
    row(
        "join: known by all nodes after",
        fmt_ms(reach(&w.joined, others, 1.0, join_at)),
        "",
    );
    let alive_others = running.len();
    row(
        "kill -9: declared dead by all after",
        fmt_ms(reach(&w.downed, alive_others, 1.0, kill_at)),
        "<= 5 s",
    );
    row(
        "kill -9: declared dead by half after",
        fmt_ms(reach(&w.downed, alive_others, 0.5, kill_at)),
        "",
    );
    row(
        "kill -9: declared dead by 99.9% after",
        fmt_ms(reach(&w.downed, alive_others, 0.999, kill_at)),
        "",
    );
    row(
        "false positives (live node declared down)",
        format!("{}", w.false_downs),
        "0",
    );
    row(
        "self-refutations lost (rejoin/defunct)",
        format!("{}", w.rejoins),
        "0",
    );
    let mut wide_all: Vec<f64> = w
        .wide_reach
        .iter()
        .zip(&w.wide_published)
        .filter_map(|(r, (at, origin))| {
            // over the nodes that ran to the end (not the victim)
            let r: HashMap<u32, u64> = r
                .iter()
                .filter(|(k, _)| sim.is_running(**k))
                .map(|(k, v)| (*k, *v))
                .collect();
            let of = running.iter().filter(|&&i| i != *origin).count();
            reach(&r, of, 1.0, *at).map(|ms| ms as f64)
        })
        .collect();
    wide_all.sort_by(|a, b| a.total_cmp(b));
    let never = w.wide_reach.len() - wide_all.len();
    row(
        "model change (broadcast) reaches all: p50 / max",
        format!(
            "{:.2} s / {:.2} s ({never} never)",
            pct(&wide_all, 0.5) / 1000.0,
            wide_all.last().copied().unwrap_or(f64::NAN) / 1000.0
        ),
        "",
    );
    row(
        "traffic per node: SWIM (probes, gossip)",
        format!("{swim_kbit:.2} kbit/s"),
        "",
    );
    row(
        "traffic per node: advert pushes",
        format!("{push_kbit:.2} kbit/s"),
        "",
    );
    row(
        "traffic per node: total (sent)",
        format!("{:.2} kbit/s", swim_kbit + push_kbit),
        "<= 10 kbit/s",
    );
    row(
        "load adverts younger than 3 s held: p50 / min",
        format!(
            "{:.1}% / {:.1}% of nodes",
            pct(&fresh_share, 0.5) * 100.0,
            fresh_share.first().copied().unwrap_or(f64::NAN) * 100.0
        ),
        "",
    );
    row(
        "advert age reported - true: min / mean (ms)",
        format!(
            "{} / {:.1} ({aged} adverts)",
            min_err,
            sum_over / aged.max(1) as f64
        ),
        "min >= 0",
    );
    row(
        "route(): gossiped view, usable nodes",
        format!("{usable}"),
        "",
    );
    row(
        "route(): gossiped view p50 / p99",
        format!("{p50:.1} / {p99:.1} us"),
        "",
    );
    row(
        &format!("route(): all {n} adverts fresh, p50 / p99"),
        format!("{full_p50:.1} / {full_p99:.1} us"),
        "p99 <= 200 us",
    );
    row(
        "packets dropped / node errors",
        format!("{} / {}", sim.dropped, sim.errors),
        "errors 0",
    );
    row(
        &format!("wall time for {secs} virtual s"),
        format!("{wall_s:.1} s (CPU {cpu_s:.1} s)"),
        if n <= 1000 { "<= 60 s (600 s)" } else { "" },
    );
    row(
        "load average before / after",
        format!("{load_before} / {}", loadavg()),
        "",
    );
}

/// Feed node `me`'s gossiped adverts to a real [`Router`] and time
/// `route()`; then the same with every advert taken as fresh (the cost when
/// all holders are candidates).
fn decisions(sim: &Sim, me: u32, now: u64) -> (usize, f64, f64, f64, f64) {
    let Some(node) = sim.node(me) else {
        return (0, f64::NAN, f64::NAN, f64::NAN, f64::NAN);
    };
    let alive: std::collections::HashSet<u32> = node.members().map(|m| m.n).collect();
    let adverts = node.adverts();
    let states = |all_fresh: bool| -> Vec<NodeState> {
        adverts
            .iter()
            .filter_map(|(k, a)| {
                let l: Load = postcard::from_bytes(&a.payload).ok()?;
                let names = |mask: u32| -> Vec<String> {
                    (0..MODELS)
                        .filter(|b| mask & (1 << b) != 0)
                        .map(|b| format!("model-{b}"))
                        .collect()
                };
                Some(NodeState {
                    id: k.to_string(),
                    alive: *k == me || alive.contains(k),
                    advert_at_ms: if all_fresh { now } else { a.made_at_ms(now) },
                    models: names(l.models),
                    loaded: names(l.loaded),
                    busy: Vec::new(),
                    max_loaded: 2,
                    in_flight: u32::from(l.in_flight),
                    queue_depth: u32::from(l.queue),
                    max_queue: u32::from(l.max_queue),
                })
            })
            .collect()
    };
    let time = |all_fresh: bool| -> (usize, f64, f64) {
        let mut r = Router::new(me.to_string(), STALE_AFTER_MS);
        for s in states(all_fresh) {
            r.update(s);
        }
        let mut usable = 0;
        let mut us = Vec::with_capacity(3_200);
        for i in 0..3_200u32 {
            let model = format!("model-{}", i % MODELS);
            let t = Instant::now();
            let got = r.route(&model, now);
            us.push(t.elapsed().as_secs_f64() * 1e6);
            if let Ok(order) = got {
                usable = usable.max(order.len());
            }
        }
        us.sort_by(|a, b| a.total_cmp(b));
        (usable, pct(&us, 0.5), pct(&us, 0.99))
    };
    let (usable, p50, p99) = time(false);
    let (_, f50, f99) = time(true);
    (usable, p50, p99, f50, f99)
}

fn partition_run(n: u32, seed: u64) {
    let cfg = SwimConfig::for_cluster(n);
    let mut sim = Sim::new(n, cfg, Net::default(), seed);
    let wall = Instant::now();
    sim.start_converged(0..n);
    let big = n * 6 / 10;
    // five Raft voters (consensus.voters), spread over the node range as a
    // placement that knows nothing of the cut would put them
    let voters: Vec<u32> = (0..5).map(|i| i * n / 5 + n / 10).collect();
    sim.run_until(5_000, &mut |_, _, _| {});
    sim.partition(|i| u8::from(i >= big));
    sim.run_until(35_000, &mut |_, _, _| {});
    header(&format!(
        "partition of {n} nodes into {big} / {}, then healed (seed {seed}); voters at {voters:?}",
        n - big
    ));
    for side in 0..2u8 {
        let members: Vec<u32> = (0..n).filter(|&i| sim.side(i) == side).collect();
        let views: Vec<usize> = members
            .iter()
            .filter_map(|&i| sim.node(i).map(|s| s.num_members()))
            .collect();
        let crossing = members
            .iter()
            .filter(|&&i| {
                sim.node(i)
                    .is_some_and(|s| s.members().any(|m| sim.side(m.n) != side))
            })
            .count();
        let side_voters: Vec<u32> = voters
            .iter()
            .copied()
            .filter(|v| sim.side(*v) == side)
            .collect();
        // the quorum model: a catalogue change commits when a voter on this
        // side sees a majority of all voters (itself included) alive
        let reachable = side_voters
            .first()
            .and_then(|&v| sim.node(v))
            .map_or(0, |s| {
                1 + s
                    .members()
                    .filter(|m| voters.contains(&m.n) && m.n != side_voters[0])
                    .count()
            });
        let quorum = voters.len() / 2 + 1;
        let label = if side == 0 { "majority" } else { "minority" };
        row(
            &format!(
                "side {label} ({} nodes): view size min / max",
                members.len()
            ),
            format!(
                "{} / {}",
                views.iter().min().unwrap_or(&0),
                views.iter().max().unwrap_or(&0)
            ),
            &format!("{}", members.len() - 1),
        );
        row(
            &format!("side {label}: nodes still seeing the other side"),
            format!("{crossing}"),
            "0",
        );
        row(
            &format!("side {label}: voters reachable / quorum"),
            format!("{reachable} / {quorum}"),
            "",
        );
        row(
            &format!("side {label}: catalogue change"),
            if reachable >= quorum {
                "commits".into()
            } else {
                "refused (no quorum)".into()
            },
            if side == 0 { "commits" } else { "refused" },
        );
    }
    sim.heal();
    let healed_at = sim.now_ms;
    let mut one_view = None;
    let mut t = healed_at;
    while t < healed_at + 300_000 {
        t += 1_000;
        sim.run_until(t, &mut |_, _, _| {});
        if (0..n).all(|i| {
            sim.node(i)
                .is_some_and(|s| s.num_members() == n as usize - 1)
        }) {
            one_view = Some(t - healed_at);
            break;
        }
    }
    row(
        "after healing: one view of all nodes after",
        fmt_ms(one_view),
        "one view",
    );
    row(
        "packets dropped / node errors",
        format!("{} / {}", sim.dropped, sim.errors),
        "errors 0",
    );
    row(
        "wall time",
        format!("{:.1} s", wall.elapsed().as_secs_f64()),
        "",
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: u64| -> u64 {
        args.get(i).and_then(|s| s.parse().ok()).unwrap_or(default)
    };
    match args.first().map(String::as_str) {
        Some("main") => main_run(arg(1, 1000) as u32, arg(2, 600), arg(3, 1), 0.05),
        Some("partition") => partition_run(arg(1, 1000) as u32, arg(2, 1)),
        None | Some("all") => {
            main_run(1000, 600, 1, 0.05);
            partition_run(1000, 1);
            main_run(10_000, 60, 1, 0.05);
        }
        Some(other) => {
            eprintln!("usage: sim [all | main NODES SECS [SEED] | partition NODES [SEED]] (got {other:?})");
            std::process::exit(2);
        }
    }
}
