//! The node's bandwidth cap on blob transfers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The bandwidth cap lets this much through at once after an idle spell.
const BURST: Duration = Duration::from_millis(50);

/// A token bucket shared by every transfer of a node, in and out: the
/// `models.replication_bandwidth_mbps` cap. 0 means unlimited.
#[derive(Debug)]
pub struct Pacer {
    pub(super) bytes_per_sec: AtomicU64,
    next_free: Mutex<Instant>,
}

impl Default for Pacer {
    fn default() -> Self {
        Self {
            bytes_per_sec: AtomicU64::new(0),
            next_free: Mutex::new(Instant::now()),
        }
    }
}

impl Pacer {
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.bytes_per_sec.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// Wait until `n` more bytes fit under the cap.
    pub async fn take(&self, n: usize) {
        let rate = self.bytes_per_sec.load(Ordering::Relaxed);
        if rate == 0 {
            return;
        }
        let cost = Duration::from_secs_f64(n as f64 / rate as f64);
        let wake = {
            let mut next = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let start = (*next).max(now.checked_sub(BURST).unwrap_or(now));
            *next = start + cost;
            *next
        };
        let now = Instant::now();
        if wake > now + BURST {
            tokio::time::sleep(wake - now - BURST).await;
        }
    }
}
