//! Forwarding between nodes of a formed cluster, and its leader's failover.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_forms_forwards_and_survives_its_leader() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = three(dir.path()).await;
    let leaders: Vec<_> = nodes
        .iter()
        .filter(|n| n.status().role == "leader")
        .collect();
    assert_eq!(leaders.len(), 1);
    for n in &nodes {
        let s = n.status();
        assert!(!s.degraded, "{s:?}");
        assert_eq!(s.voters.len(), 3);
        assert_eq!(s.peers_connected, 2);
        assert_eq!(s.leader_id.as_deref(), Some(leaders[0].node_id()));
    }
    assert_eq!(nodes[0].counters.joins_accepted.load(Ordering::Relaxed), 1);
    assert_eq!(nodes[1].counters.joins_accepted.load(Ordering::Relaxed), 1);

    // adverts reach every node
    nodes[2].publish_advert(Bytes::from_static(b"{\"in_flight\":3}"));
    let n0 = nodes[0].clone();
    wait_for("c's advert at a", Duration::from_secs(3), || {
        n0.nodes()
            .iter()
            .any(|v| v.id == "c" && v.advert.as_ref().is_some_and(|a| a["in_flight"] == 3))
    })
    .await;

    // forwarding: a → c streams chunks in order
    let cancelled = Arc::new(AtomicU64::new(0));
    serve(nodes[2].clone(), cancelled.clone());
    let conns_before = nodes[0].status().connections_established;
    let mut s = nodes[0].forward("c", br#"{"n":1000}"#).await.unwrap();
    let mut got = Vec::new();
    while s.next_batch(&mut got).await.unwrap() {}
    assert_eq!(got.len(), 1000);
    assert_eq!(&got[999][..], b"{\"k\":999}");
    // many requests, one connection: each request is a stream on it
    for _ in 0..200 {
        let mut s = nodes[0].forward("c", br#"{"n":2}"#).await.unwrap();
        let mut got = Vec::new();
        while s.next_batch(&mut got).await.unwrap() {}
        assert_eq!(got.len(), 2);
    }
    assert_eq!(nodes[0].status().connections_established, conns_before);
    assert_eq!(nodes[0].status().peers_connected, 2);

    // remote errors keep their status
    let mut s = nodes[0].forward("c", br#"{"fail":true}"#).await.unwrap();
    let mut got = Vec::new();
    assert_eq!(
        s.next_batch(&mut got).await,
        Err(ForwardError::Remote {
            status: 404,
            message: "model 'x' not found".into()
        })
    );
    // unknown peers are unavailable, not errors of the request
    assert!(matches!(
        nodes[0].forward("zz", b"{}").await,
        Err(ForwardError::Unavailable(_))
    ));

    // dropping the caller's stream cancels the work at the far side
    let mut s = nodes[0]
        .forward("c", br#"{"n":100000,"slow":true}"#)
        .await
        .unwrap();
    let mut got = Vec::new();
    s.next_batch(&mut got).await.unwrap();
    drop(s);
    let c2 = cancelled.clone();
    let took = wait_for("cancellation at c", Duration::from_secs(3), || {
        c2.load(Ordering::SeqCst) == 1
    })
    .await;
    eprintln!("cancellation reached the far side in {took:?}");

    // stop the leader: a new one within 5 s, the survivors see it down
    let li = nodes
        .iter()
        .position(|n| n.status().role == "leader")
        .unwrap();
    let old = nodes[li].node_id().to_owned();
    nodes[li].stop().await;
    let rest: Vec<_> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != li)
        .map(|(_, n)| n.clone())
        .collect();
    let r = rest.clone();
    let took = wait_for("new leader", Duration::from_secs(5), || {
        r.iter()
            .any(|n| n.status().role == "leader" && n.status().leader_id.as_deref() != Some(&old))
    })
    .await;
    eprintln!("new leader after {took:?}");
    let r = rest.clone();
    wait_for("old leader marked down", Duration::from_secs(3), || {
        r.iter()
            .all(|n| n.nodes().iter().any(|v| v.id == old && !v.alive))
    })
    .await;
    for n in &rest {
        n.stop().await;
    }
}

/// Rust-only forward round trip; `cargo test --release -- --ignored --nocapture rtt`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn rtt() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = three(dir.path()).await;
    serve(nodes[2].clone(), Arc::new(AtomicU64::new(0)));
    let mut times = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        let mut s = nodes[0].forward("c", br#"{"n":1}"#).await.unwrap();
        let mut got = Vec::new();
        while s.next_batch(&mut got).await.unwrap() {}
        times.push(t.elapsed().as_micros());
    }
    times.sort();
    eprintln!(
        "rust-only forward round trip: p50 {} us p99 {} us",
        times[1000], times[1980]
    );
}
