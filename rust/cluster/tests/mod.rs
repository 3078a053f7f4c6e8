//! Several nodes in one process on 127.0.0.1, each with its own data dir.
//! Helpers here; the tests by concern in the submodules.

use std::time::{Duration, Instant};

use super::*;

mod ca_key;
mod forwarding;
mod handover;
mod membership;
mod replication;
mod security;
mod tunnel;

fn cfg(id: &str, dir: &std::path::Path, join: Vec<String>, token: Option<String>) -> ClusterConfig {
    ClusterConfig {
        node_id: id.into(),
        data_dir: dir.join(id),
        host: "127.0.0.1".into(),
        port: 0,
        join,
        token,
        api_address: format!("http://127.0.0.1/{id}"),
        failure_timeout: Duration::from_millis(1000),
        max_voters: crate::consensus::MAX_VOTERS,
    }
}

async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t0.elapsed()
}

fn seed(c: &Cluster) -> Vec<String> {
    vec![c.local_addr().unwrap().to_string()]
}

async fn three(dir: &std::path::Path) -> Vec<Arc<Cluster>> {
    let a = Cluster::start(cfg("a", dir, vec![], None)).await.unwrap();
    wait_for("a to lead", Duration::from_secs(5), || {
        a.status().role == "leader"
    })
    .await;
    let token = Some(a.join_token());
    let b = Cluster::start(cfg("b", dir, seed(&a), token.clone()))
        .await
        .unwrap();
    let c = Cluster::start(cfg("c", dir, seed(&b), token))
        .await
        .unwrap();
    let all = vec![a, b, c];
    let nodes = all.clone();
    wait_for(
        "3 voters seen alive by all",
        Duration::from_secs(10),
        || {
            nodes.iter().all(|n| {
                let v = n.nodes();
                v.len() == 3 && v.iter().all(|x| x.alive && x.voter)
            })
        },
    )
    .await;
    all
}

/// Serve forwarded requests: answer `n` chunks, or an error for "fail".
fn serve(c: Arc<Cluster>, cancelled: Arc<AtomicU64>) {
    tokio::spawn(async move {
        while let Some(i) = c.next_inbound().await {
            let cancelled = cancelled.clone();
            tokio::spawn(async move {
                let req: serde_json::Value = serde_json::from_slice(&i.request).unwrap();
                if req["fail"].as_bool() == Some(true) {
                    i.reply.error(404, "model 'x' not found".into());
                    return;
                }
                let n = req["n"].as_u64().unwrap();
                for k in 0..n {
                    if !i.reply.chunk(Bytes::from(format!("{{\"k\":{k}}}"))) {
                        break;
                    }
                    if req["slow"].as_bool() == Some(true) {
                        tokio::select! {
                            _ = i.reply.cancelled() => { cancelled.fetch_add(1, Ordering::SeqCst); return; }
                            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        }
                    }
                }
                i.reply.end();
            });
        }
    });
}
