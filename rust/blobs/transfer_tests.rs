//! Fetches over a real QUIC connection (no cluster around it): a stream that
//! breaks mid-blob keeps the partial and the next fetch resumes from it; a
//! failure of this node's own disk removes the partial and asks no other
//! peer. (ENOSPC itself, on a small tmpfs, is in
//! tests/cluster/test_replication_faults.py.)

use std::net::SocketAddr;

use super::*;
use crate::transport::tls::{TlsMaterial, SERVER_NAME};
use crate::transport::{self};

const TIMEOUT: Duration = Duration::from_secs(5);

/// A holder on 127.0.0.1: serves `blobs` fetches, or, with `cut` (the blob and
/// the fetcher's partial), announces the blob, sends its first data frame and
/// resets the stream once the fetcher has written that frame (a reset drops
/// what the peer has not read yet, so a fixed pause failed on a busy machine).
fn holder(
    blobs: Arc<Blobs>,
    cut: Option<(Vec<u8>, std::path::PathBuf)>,
) -> (quinn::Endpoint, SocketAddr, TlsMaterial) {
    let mat = TlsMaterial::create("holder").unwrap();
    let server = transport::bind("127.0.0.1:0".parse().unwrap(), &mat, TIMEOUT).unwrap();
    let addr = server.local_addr().unwrap();
    let ep = server.clone();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let Ok(conn) = incoming.await else { continue };
            let (blobs, cut) = (blobs.clone(), cut.clone());
            tokio::spawn(async move {
                while let Ok((mut send, recv)) = conn.accept_bi().await {
                    let mut reader = FrameReader::new(recv);
                    let Ok(Some(first)) = reader.next().await else {
                        continue;
                    };
                    match &cut {
                        None => blobs.serve("fetcher", &first.payload, send).await,
                        Some((data, partial)) => {
                            let info = serde_json::to_vec(&BlobInfo {
                                size: data.len() as u64,
                            })
                            .unwrap();
                            write_frame(&mut send, Kind::BlobInfo, &info).await.unwrap();
                            write_frame(&mut send, Kind::BlobData, &data[..DATA_FRAME])
                                .await
                                .unwrap();
                            let t0 = std::time::Instant::now();
                            while std::fs::metadata(partial).map_or(0, |m| m.len())
                                < DATA_FRAME as u64
                                && t0.elapsed() < Duration::from_secs(30)
                            {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                            let _ = send.reset(quinn::VarInt::from_u32(1));
                        }
                    }
                }
            });
        }
    });
    (server, addr, mat)
}

async fn connect(addr: SocketAddr, mat: &TlsMaterial) -> (quinn::Endpoint, quinn::Connection) {
    // as a node's endpoint: its buffers and datagram size
    let mut ep = transport::endpoint(
        transport::udp_socket("127.0.0.1:0".parse().unwrap()).unwrap(),
        None,
    )
    .unwrap();
    ep.set_default_client_config(
        transport::client_config(mat.client_config().unwrap(), TIMEOUT).unwrap(),
    );
    let conn = ep.connect(addr, SERVER_NAME).unwrap().await.unwrap();
    (ep, conn)
}

/// A blob store under `root` that holds `data` as blob `hex`.
fn holding(root: &std::path::Path, hex: &str, data: &[u8]) -> Arc<Blobs> {
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    std::fs::write(root.join("blobs").join(format!("sha256-{hex}")), data).unwrap();
    let blobs = Arc::new(Blobs::default());
    blobs.configure(root.to_path_buf(), 0);
    blobs
}

fn blob(n: usize) -> (Vec<u8>, String) {
    let data: Vec<u8> = (0..n as u32).map(|i| (i * 31 + i / 97) as u8).collect();
    let hex = hex::encode(Sha256::digest(&data));
    (data, hex)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_stream_keeps_the_partial_and_the_next_fetch_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (data, hex) = blob(3 * DATA_FRAME + 1000);
    let fetcher = Blobs::default();
    fetcher.configure(dir.path().join("b"), 0);
    let partial = dir
        .path()
        .join("b/tmp")
        .join(format!("p2p-sha256-{hex}.partial"));

    let (_cut_ep, cut_addr, cut_mat) = holder(
        Arc::new(Blobs::default()),
        Some((data.clone(), partial.clone())),
    );
    let (_c1, conn) = connect(cut_addr, &cut_mat).await;
    let e = fetcher.fetch_blob(&conn, "cutter", &hex).await.unwrap_err();
    assert!(matches!(e, BlobError::Unavailable(_)), "{e}");
    assert_eq!(std::fs::read(&partial).unwrap(), data[..DATA_FRAME]);

    let good = holding(&dir.path().join("a"), &hex, &data);
    let (_g, addr, mat) = holder(good.clone(), None);
    let (_c2, conn) = connect(addr, &mat).await;
    let got = fetcher.fetch_blob(&conn, "holder", &hex).await.unwrap();
    // MTU discovery climbs past an Ethernet frame on loopback (both ends
    // accept large datagrams), so a blob moves in few, large packets
    let t0 = std::time::Instant::now();
    while conn.stats().path.current_mtu <= 1452 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the path MTU stayed at {}",
            conn.stats().path.current_mtu
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(std::fs::read(got).unwrap(), data);
    assert!(!partial.exists());
    // resumed: only what the partial lacked crossed the second time
    assert_eq!(
        good.status().totals.bytes_out,
        (data.len() - DATA_FRAME) as u64
    );
    let t = fetcher.status().totals;
    assert_eq!((t.failed_in, t.completed_in), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_write_failure_removes_the_partial_and_tries_no_other_peer() {
    let dir = tempfile::tempdir().unwrap();
    let (data, hex) = blob(2 * DATA_FRAME);
    let good = holding(&dir.path().join("a"), &hex, &data);
    let (_g, addr, mat) = holder(good.clone(), None);
    let (_c, conn) = connect(addr, &mat).await;

    // the partial is a link into a folder that is not there: opening it for
    // writing fails here, on this node, whoever sends the bytes
    let root_b = dir.path().join("b");
    let partial = root_b.join("tmp").join(format!("p2p-sha256-{hex}.partial"));
    std::fs::create_dir_all(root_b.join("tmp")).unwrap();
    std::os::unix::fs::symlink(dir.path().join("gone/x"), &partial).unwrap();
    let fetcher = Blobs::default();
    fetcher.configure(root_b.clone(), 0);
    let sources = vec![
        ("first".to_string(), conn.clone()),
        ("second".to_string(), conn.clone()),
    ];
    let e = fetcher.fetch_blob_multi(&sources, &hex).await.unwrap_err();
    assert!(matches!(e, BlobError::Io(_)), "{e}");
    assert!(
        partial.symlink_metadata().is_err(),
        "the local failure left {partial:?}"
    );
    assert!(!root_b.join("blobs").join(format!("sha256-{hex}")).exists());
    let t = fetcher.status().totals;
    assert_eq!(t.failed_in, 1, "{t:?}"); // the second source was not asked
    assert!(
        t.last_error
            .as_deref()
            .unwrap_or("")
            .contains("from 'first'"),
        "{t:?}"
    );
    assert_eq!(good.status().totals.bytes_out, 0);
}
