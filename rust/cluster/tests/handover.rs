//! Issue 13 in the core: a draining leader hands over (consensus::handover),
//! and a forwarded stream learns that its serving node went silent before
//! the idle timeout would say so (forward::Watch), without giving up on a
//! node that is slow but alive.

use std::time::{Duration, Instant};

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_leader_hands_over_to_a_caught_up_voter() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = three(dir.path()).await;
    let leader = nodes
        .iter()
        .find(|n| n.status().role == "leader")
        .unwrap()
        .clone();
    let term0 = leader.status().term;
    // Joins leave membership entries in flight for a while; a successor is
    // caught up only until the leader appends the next one, so wait until
    // every log is the leader's and stays so.
    let last = |n: &Arc<Cluster>| n.raft.metrics().borrow().last_log_index;
    let mut next = Vec::new();
    let mut settled = 0;
    wait_for(
        "logs settled, two caught-up successors",
        Duration::from_secs(10),
        || {
            next = leader.successors();
            let same = nodes.iter().all(|n| last(n) == last(&leader));
            settled = if same && next.len() == 2 {
                settled + 1
            } else {
                0
            };
            settled >= 25 // half a second (wait_for polls every 20 ms)
        },
    )
    .await;
    assert!(!next.iter().any(|n| n == leader.node_id()), "{next:?}");
    let followers: Vec<_> = nodes
        .iter()
        .filter(|n| n.node_id() != leader.node_id())
        .collect();
    assert!(
        followers.iter().all(|f| f.successors().is_empty()),
        "only a leader names successors"
    );

    leader.hold_candidacy(true);
    let heir = nodes
        .iter()
        .find(|n| n.node_id() == next[0])
        .unwrap()
        .clone();
    let t0 = Instant::now();
    heir.campaign().await.unwrap();
    let h = heir.clone();
    wait_for("the heir leads", Duration::from_secs(3), || {
        h.status().role == "leader"
    })
    .await;
    eprintln!("leadership handed over in {:?}", t0.elapsed());
    let l = leader.clone();
    let heir_id = heir.node_id().to_owned();
    wait_for(
        "every node follows the heir",
        Duration::from_secs(3),
        || {
            nodes
                .iter()
                .all(|n| n.status().leader_id.as_deref() == Some(heir_id.as_str()))
        },
    )
    .await;
    assert_eq!(l.status().role, "follower");
    assert!(heir.status().term > term0);
    // held: the old leader stays a follower, and the cluster keeps its leader
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(l.status().role, "follower");
    assert_eq!(heir.status().role, "leader");
    assert!(nodes.iter().all(|n| !n.status().degraded));
    for n in &nodes {
        n.stop().await;
    }
}

/// Serve every forwarded request with `{"n", "gap_ms"}`: n chunks, gap_ms apart.
fn serve_gaps(c: Arc<Cluster>) {
    tokio::spawn(async move {
        while let Some(i) = c.next_inbound().await {
            tokio::spawn(async move {
                let req: serde_json::Value = serde_json::from_slice(&i.request).unwrap();
                for k in 0..req["n"].as_u64().unwrap() {
                    if !i.reply.chunk(Bytes::from(format!("{{\"k\":{k}}}"))) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(req["gap_ms"].as_u64().unwrap()))
                        .await;
                }
                i.reply.end();
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_ends_the_stream_before_the_idle_timeout_a_slow_one_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let a = Cluster::start(cfg("a", dir.path(), vec![], None))
        .await
        .unwrap();
    wait_for("a to lead", Duration::from_secs(5), || {
        a.status().role == "leader"
    })
    .await;
    // b runs on a runtime of its own (one thread), so the test can freeze it
    // whole, as SIGSTOP or a dead process would: its QUIC stack answers nothing.
    let (token, seeds, path) = (a.join_token(), seed(&a), dir.path().to_owned());
    let (tx, rx) = std::sync::mpsc::channel();
    let (freeze_tx, freeze_rx) = std::sync::mpsc::channel::<Duration>();
    let b_thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let b = Cluster::start(cfg("b", &path, seeds, Some(token)))
                .await
                .unwrap();
            serve_gaps(b.clone());
            tx.send(b.clone()).unwrap();
            loop {
                // polled, so b's runtime goes on serving meanwhile
                match freeze_rx.try_recv() {
                    Ok(d) => std::thread::sleep(d), // blocks b's only thread: b is frozen
                    Err(std::sync::mpsc::TryRecvError::Empty) => {
                        tokio::time::sleep(Duration::from_millis(10)).await
                    }
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
                }
            }
            b.stop().await;
        });
    });
    let b = rx.recv().unwrap();
    wait_for("a and b connected", Duration::from_secs(10), || {
        a.nodes().iter().any(|v| v.id == "b" && v.alive)
    })
    .await;
    let ft = Duration::from_millis(1000); // cfg's failure timeout
    let watch = forward::Watch::for_failure_timeout(ft);

    // slow but alive: gaps three times the quiet time, every probe answered
    let gap = watch.quiet * 3;
    let body = format!("{{\"n\":6,\"gap_ms\":{}}}", gap.as_millis());
    let mut s = a.forward("b", body.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    while s.next_batch(&mut got).await.unwrap() {}
    assert_eq!(got.len(), 6, "a slow stream was given up");

    // frozen mid-stream: the stream ends as unavailable after quiet + probe,
    // before the connection's idle timeout
    let mut s = a.forward("b", br#"{"n":1000,"gap_ms":20}"#).await.unwrap();
    let mut got = Vec::new();
    s.next_batch(&mut got).await.unwrap();
    freeze_tx.send(Duration::from_millis(2500)).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await; // b's last packets land
    let t0 = Instant::now();
    let err = loop {
        match s.next_batch(&mut got).await {
            Ok(true) => continue,
            Ok(false) => panic!("the stream ended normally while b was frozen"),
            Err(e) => break e,
        }
    };
    let took = t0.elapsed();
    eprintln!("frozen peer detected in {took:?}: {err}");
    // "silent": the probe ended it; the idle timeout would have closed the
    // connection (`ft`) and said "timed out"
    assert!(
        matches!(err, ForwardError::Unavailable(ref m) if m.contains("silent")),
        "{err}"
    );
    drop(freeze_tx);
    b_thread.join().unwrap();
    drop(b);
    a.stop().await;
}
