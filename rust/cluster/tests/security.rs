//! Refusals: wrong tokens, missing or borrowed certificates, oversized or
//! too many unauthenticated connections, join request parsing.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_and_missing_certificate_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = Cluster::start(cfg("a", dir.path(), vec![], None))
        .await
        .unwrap();
    wait_for("a to lead", Duration::from_secs(5), || {
        a.status().role == "leader"
    })
    .await;
    let mut bad = JoinToken::parse(&a.join_token()).unwrap();
    bad.secret = "0123".into();
    let err = Cluster::start(cfg("x", dir.path(), seed(&a), Some(bad.render())))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, ClusterError::JoinRefused(_)), "{err}");
    assert_eq!(a.counters.joins_refused.load(Ordering::Relaxed), 1);
    assert!(!dir.path().join("x/tls/node.pem").exists());

    // a token pinning another CA refuses the server before sending the secret
    let other = TlsMaterial::create("o").unwrap().token();
    let err = Cluster::start(cfg("y", dir.path(), seed(&a), Some(other.render())))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, ClusterError::JoinRefused(_)), "{err}");

    // a connection without a client certificate may not speak Raft or Hello
    let tls = TlsMaterial::load(&dir.path().join("a/tls")).unwrap();
    let client = transport::client_config(
        crate::transport::tls::untrusted_client_config(&tls.ca, None).unwrap(),
        Duration::from_secs(2),
    )
    .unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep
        .connect_with(
            client,
            a.local_addr().unwrap(),
            crate::transport::tls::SERVER_NAME,
        )
        .unwrap()
        .await
        .unwrap();
    let r = transport::call(
        &conn,
        Kind::Hello,
        br#"{"id":"evil"}"#,
        Duration::from_secs(2),
    )
    .await;
    assert!(r.is_err(), "{r:?}");
    assert_eq!(
        a.counters.unauthenticated_refused.load(Ordering::Relaxed),
        1
    );
    assert!(a.nodes().iter().all(|n| n.id != "evil"));

    // a client certificate from another CA fails the handshake
    let foreign = TlsMaterial::create("f").unwrap();
    let client = transport::client_config(
        crate::transport::tls::untrusted_client_config(&tls.ca, Some(&foreign)).unwrap(),
        Duration::from_secs(2),
    )
    .unwrap();
    let r = async {
        let conn = ep
            .connect_with(
                client,
                a.local_addr().unwrap(),
                crate::transport::tls::SERVER_NAME,
            )?
            .await?;
        transport::call(
            &conn,
            Kind::Hello,
            br#"{"id":"evil"}"#,
            Duration::from_secs(2),
        )
        .await
    }
    .await;
    assert!(r.is_err(), "{r:?}");
    a.stop().await;
}

/// A client endpoint presenting a certificate the cluster CA issued to `id`.
async fn certified_client(ca_dir: &std::path::Path, id: &str, to: SocketAddr) -> quinn::Connection {
    let tls = TlsMaterial::load(ca_dir).unwrap();
    let node = tls.ca.issue(id).unwrap();
    let own = TlsMaterial {
        ca: crate::transport::tls::ClusterCa::from_pem(&tls.ca.cert_pem, None).unwrap(),
        node,
        secret: String::new(),
    };
    let client =
        transport::client_config(own.client_config().unwrap(), Duration::from_secs(5)).unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.connect_with(client, to, crate::transport::tls::SERVER_NAME)
        .unwrap()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_may_only_speak_for_the_node_its_certificate_names() {
    let dir = tempfile::tempdir().unwrap();
    let a = Cluster::start(cfg("a", dir.path(), vec![], None))
        .await
        .unwrap();
    wait_for("a to lead", Duration::from_secs(5), || {
        a.status().role == "leader"
    })
    .await;
    let ca_dir = dir.path().join("a/tls");
    let to = a.local_addr().unwrap();
    let t = Duration::from_secs(5);

    // === a Hello as another node
    let conn = certified_client(&ca_dir, "x", to).await;
    assert!(transport::call(&conn, Kind::Hello, br#"{"id":"y"}"#, t)
        .await
        .is_err());
    assert_eq!(a.counters.refusals(Refusal::Hello), 1);
    assert!(a.mesh.connection("y").is_none());

    // === its own name is fine
    let conn = certified_client(&ca_dir, "x", to).await;
    let f = transport::call(&conn, Kind::Hello, br#"{"id":"x"}"#, t)
        .await
        .unwrap();
    assert_eq!(f.kind, Kind::Hello);

    // === an advert for another node
    transport::push(&conn, Kind::Advert, Bytes::from_static(b"y\n{}"))
        .await
        .unwrap();
    let a2 = a.clone();
    wait_for("the advert refused", t, || {
        a2.counters.refusals(Refusal::Advert) == 1
    })
    .await;
    assert!(a.nodes().iter().all(|n| n.id != "y"));

    // === a Raft vote on behalf of another node
    let conn = certified_client(&ca_dir, "x", to).await;
    let vote = openraft::raft::VoteRequest::new(openraft::Vote::new(99, raft_id("y")), None);
    let body = serde_json::to_vec(&vote).unwrap();
    assert!(transport::call(&conn, Kind::RaftVote, &body, t)
        .await
        .is_err());
    assert_eq!(a.counters.refusals(Refusal::Raft), 1);
    assert_eq!(a.status().role, "leader");
    assert_eq!(a.status().term, 1);
    let refused = a.status().peers_refused;
    assert_eq!(refused["impersonation_hello"], 1);
    assert_eq!(refused["impersonation_raft"], 1);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_are_few_and_small() {
    let dir = tempfile::tempdir().unwrap();
    let a = Cluster::start(cfg("a", dir.path(), vec![], None))
        .await
        .unwrap();
    let tls = TlsMaterial::load(&dir.path().join("a/tls")).unwrap();
    let client = transport::client_config(
        crate::transport::tls::untrusted_client_config(&tls.ca, None).unwrap(),
        Duration::from_secs(5),
    )
    .unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let to = a.local_addr().unwrap();
    let connect = || async {
        ep.connect_with(client.clone(), to, crate::transport::tls::SERVER_NAME)
            .unwrap()
            .await
            .unwrap()
    };
    // === idle connections without a certificate, one over the limit
    let mut held = Vec::new();
    for _ in 0..serve::MAX_UNAUTHENTICATED_PER_SOURCE {
        held.push(connect().await);
    }
    let extra = connect().await;
    let why = tokio::time::timeout(Duration::from_secs(5), extra.closed())
        .await
        .unwrap();
    assert!(
        matches!(why, quinn::ConnectionError::ApplicationClosed(ref c) if c.error_code == transport::codes::BUSY),
        "{why:?}"
    );
    assert_eq!(a.counters.refusals(Refusal::UnauthenticatedLimit), 1);
    for c in held.drain(..) {
        c.close(0u32.into(), b"");
    }
    let a2 = a.clone();
    wait_for("the slots given back", Duration::from_secs(5), || {
        a2.unauthenticated.lock().unwrap().is_empty()
    })
    .await;

    // === a join request over the bound is refused unread
    let conn = connect().await;
    let big = serde_json::to_vec(&serde_json::json!({
        "secret": "s".repeat(MAX_JOIN_REQUEST),
        "node_id": "big",
        "p2p_address": "127.0.0.1:1",
        "api_address": "",
    }))
    .unwrap();
    let r = transport::call(&conn, Kind::JoinRequest, &big, Duration::from_secs(5)).await;
    assert!(r.is_err(), "{r:?}");
    assert_eq!(a.counters.refusals(Refusal::UnauthenticatedOversize), 1);
    assert_eq!(a.counters.joins_refused.load(Ordering::Relaxed), 0);
    a.stop().await;
}

#[test]
fn join_requests_are_parsed_bounded_and_checked() {
    let ok = br#"{"secret":"s","node_id":"n","p2p_address":"10.0.0.1:4001","api_address":"http://10.0.0.1:11434"}"#;
    assert_eq!(JoinRequest::parse(ok).unwrap().node_id, "n");
    let big = vec![b' '; MAX_JOIN_REQUEST + 1];
    assert_eq!(
        JoinRequest::parse(&big).err(),
        Some(JoinParseError::TooLarge(MAX_JOIN_REQUEST + 1))
    );
    for (bad, why) in [
        (&b"{"[..], JoinParseError::Malformed),
        (
            br#"{"secret":"s","node_id":"","p2p_address":"10.0.0.1:1","api_address":""}"#,
            JoinParseError::NodeId,
        ),
        (
            br#"{"secret":"s","node_id":"a b","p2p_address":"10.0.0.1:1","api_address":""}"#,
            JoinParseError::NodeId,
        ),
        (
            br#"{"secret":"s","node_id":"n","p2p_address":"host","api_address":""}"#,
            JoinParseError::Address,
        ),
    ] {
        assert_eq!(JoinRequest::parse(bad).err(), Some(why));
    }
}
