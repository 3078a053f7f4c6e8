//! ggml RPC tunnels (`crate::tunnel`) between two in-process nodes, with a
//! small TCP server standing in for the RPC server.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

/// Both nodes up and connected to each other.
async fn two(dir: &std::path::Path) -> (Arc<Cluster>, Arc<Cluster>) {
    // a generous failure timeout: on a loaded machine a 1 s one can drop the
    // connection under a 4 MiB transfer, which is not what these tests test
    let patient = |mut c: ClusterConfig| {
        c.failure_timeout = Duration::from_secs(5);
        c
    };
    let a = Cluster::start(patient(cfg("a", dir, vec![], None)))
        .await
        .unwrap();
    wait_for("a to lead", Duration::from_secs(5), || {
        a.status().role == "leader"
    })
    .await;
    let b = Cluster::start(patient(cfg("b", dir, seed(&a), Some(a.join_token()))))
        .await
        .unwrap();
    let (a2, b2) = (a.clone(), b.clone());
    // both members alive in each other's view: the join's connections have
    // settled into the pair's one (a stream on a replaced one would be lost)
    wait_for(
        "a and b alive to each other",
        Duration::from_secs(10),
        || {
            [&a2, &b2]
                .iter()
                .all(|n| n.nodes().len() == 2 && n.nodes().iter().all(|x| x.alive))
        },
    )
    .await;
    (a, b)
}

/// A stand-in RPC server on 127.0.0.1: answers every read with the bytes
/// upper-cased (so an answer proves it went through the server), and closes
/// a connection that sends "bye".
async fn upper_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if &buf[..n] == b"bye" {
                        return;
                    }
                    buf[..n].make_ascii_uppercase();
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// Read until EOF or an error, bounded: how many bytes came.
async fn read_to_close(s: &mut TcpStream, within: Duration) -> usize {
    let mut got = Vec::new();
    let r = tokio::time::timeout(within, s.read_to_end(&mut got)).await;
    assert!(r.is_ok(), "the connection stayed open for {within:?}");
    got.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_cross_the_tunnel_both_ways_only_while_rpc_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two(dir.path()).await;
    let port = a.open_rpc_tunnel("b").unwrap();

    // b does not serve RPC: the tunnel is refused and the client's
    // connection ends at once
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    assert_eq!(read_to_close(&mut s, Duration::from_secs(10)).await, 0);
    assert_eq!(b.rpc_tunnels().served.refused, 1);
    assert_eq!(a.rpc_tunnels().open[0].failures, 1);

    let server = upper_server().await;
    b.set_rpc_port(Some(server));
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"hello rpc").await.unwrap();
    let mut got = [0u8; 9];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"HELLO RPC");

    // a tensor-sized message, written while the answer is read
    let big: Vec<u8> = (0..4 << 20).map(|i| b'a' + (i % 26) as u8).collect();
    let (mut r, mut w) = s.into_split();
    let expect = big.to_ascii_uppercase();
    let writer = tokio::spawn(async move {
        w.write_all(&big).await.unwrap();
        w
    });
    let mut back = vec![0u8; expect.len()];
    tokio::time::timeout(Duration::from_secs(30), r.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert!(back == expect, "the bytes came back changed");
    let w = writer.await.unwrap();
    let st = a.rpc_tunnels();
    let t = &st.open[0];
    assert_eq!((t.port, t.peer.as_str()), (port, "b"));
    assert_eq!(t.bytes_sent, 9 + (4 << 20));
    assert_eq!(t.bytes_received, 9 + (4 << 20));
    assert_eq!(t.active, 1);
    let served = b.rpc_tunnels().served;
    assert_eq!(
        (served.bytes_in, served.bytes_out),
        (9 + (4 << 20), 9 + (4 << 20))
    );
    // one way only: the server's side counts what it was given as in
    let mut s = r.reunite(w).unwrap();
    s.write_all(b"bye").await.unwrap();
    assert_eq!(read_to_close(&mut s, Duration::from_secs(10)).await, 0);
    drop(s);
    // (counted right after the write, which may come after the close it caused)
    let b2 = b.clone();
    wait_for("b to count the bye", Duration::from_secs(5), || {
        let served = b2.rpc_tunnels().served;
        (served.bytes_in, served.bytes_out) == (12 + (4 << 20), 9 + (4 << 20))
    })
    .await;

    // the server closing its side (on "bye" above) ended the client's connection
    let a2 = a.clone();
    wait_for("the bridge to end", Duration::from_secs(5), || {
        a2.rpc_tunnels().open[0].active == 0
    })
    .await;

    // turned off again: refused
    b.set_rpc_port(None);
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    assert_eq!(read_to_close(&mut s, Duration::from_secs(10)).await, 0);
    assert_eq!(b.rpc_tunnels().served.refused, 2);

    // closed: nothing listens there any more
    assert!(a.close_rpc_tunnel(port));
    assert!(!a.close_rpc_tunnel(port));
    assert!(a.rpc_tunnels().open.is_empty());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(TcpStream::connect(("127.0.0.1", port)).await.is_err());
    assert!(matches!(
        a.open_rpc_tunnel("nobody"),
        Err(crate::tunnel::TunnelError::NoPeer(_))
    ));
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serving_node_that_dies_ends_the_tunnel_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two(dir.path()).await;
    b.set_rpc_port(Some(upper_server().await));
    let port = a.open_rpc_tunnel("b").unwrap();
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    s.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"X");
    // b goes away without a word (its endpoint closed): a's client sees its
    // connection end within the failure timeout, never a silent hang
    b.stop().await;
    read_to_close(&mut s, Duration::from_secs(10)).await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_needs_the_cluster_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let a = Cluster::start(cfg("a", dir.path(), vec![], None))
        .await
        .unwrap();
    a.set_rpc_port(Some(upper_server().await));
    let tls = TlsMaterial::load(&dir.path().join("a/tls")).unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();

    // no client certificate: the connection is closed, no stream is bridged
    let client = transport::client_config(
        crate::transport::tls::untrusted_client_config(&tls.ca, None).unwrap(),
        Duration::from_secs(2),
    )
    .unwrap();
    let conn = ep
        .connect_with(
            client,
            a.local_addr().unwrap(),
            crate::transport::tls::SERVER_NAME,
        )
        .unwrap()
        .await
        .unwrap();
    let r = transport::call(&conn, Kind::RpcTunnel, b"{}", Duration::from_secs(5)).await;
    assert!(r.is_err(), "answered without a certificate: {r:?}");
    assert_eq!(
        a.counters.unauthenticated_refused.load(Ordering::Relaxed),
        1
    );

    // a certificate from another CA: the handshake itself fails
    let foreign = TlsMaterial::create("f").unwrap();
    let client = transport::client_config(
        crate::transport::tls::untrusted_client_config(&tls.ca, Some(&foreign)).unwrap(),
        Duration::from_secs(2),
    )
    .unwrap();
    let r = async {
        ep.connect_with(
            client,
            a.local_addr().unwrap(),
            crate::transport::tls::SERVER_NAME,
        )
        .ok()?
        .await
        .ok()
    };
    match r.await {
        None => {}
        Some(conn) => assert!(
            crate::tunnel::handshake("a", Some(conn)).await.is_err(),
            "bridged with a foreign certificate"
        ),
    }
    assert_eq!(a.rpc_tunnels().served.streams, 0);
    a.stop().await;
}
