//! Which node has which prompt prefix warm, approximately, without a tokenizer.
//!
//! A prompt (the rendered text, or the canonical message list when the entry
//! node cannot render it) is cut into [`BLOCK_BYTES`]-byte blocks and hashed in
//! a chain: block `i`'s hash covers the model name and every byte before the
//! end of block `i`, so equal hashes mean equal prefixes (llm-d's approximate
//! prefix scorer and SGLang's character radix tree work the same way). Each
//! node has a size-bounded set of the block hashes recently routed to it, or
//! advertised by it as warm; a request's match on a node is the number of its
//! leading blocks found there.

use std::collections::VecDeque;
use std::hash::Hasher;

use rustc_hash::{FxHashMap, FxHashSet, FxHasher};

/// Bytes per block. 64 bytes is about 16 tokens of English: fine enough that a
/// shared system prompt of a few hundred tokens is matched to within a few
/// percent, coarse enough that a 1,000-token prompt is ~60 hashes to look up.
pub const BLOCK_BYTES: usize = 64;

/// Blocks remembered per node (4,096 × 64 B = 256 KiB of prompt text, about
/// 64k tokens): several times what a CPU node keeps warm in its prompt cache,
/// so the guess does not forget before the engine does; the node's adverts
/// correct it the other way within an advert period.
pub const DEFAULT_BLOCKS_PER_NODE: usize = 4_096;

/// Routes kept per node to replay over an advert that was taken before them.
const RECENT_ROUTES: usize = 64;

/// The chain hashes of `text`'s whole blocks, for `model`. A trailing partial
/// block is left out: it is where prompts that share a prefix differ.
///
/// FxHash (rustc-hash) is deterministic across processes and platforms, which
/// the adverts need (a node hashes its warm prompts, the entry node its
/// requests), and hashes a 4 KiB prompt in well under a microsecond.
pub fn chain(model: &str, text: &str) -> Vec<u64> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len() / BLOCK_BYTES);
    let mut seed = FxHasher::default();
    seed.write(model.as_bytes());
    seed.write_u8(0xff);
    let mut prev = seed.finish();
    for block in bytes.chunks_exact(BLOCK_BYTES) {
        let mut h = FxHasher::default();
        h.write_u64(prev);
        h.write(block);
        prev = h.finish();
        out.push(prev);
    }
    out
}

#[derive(Default)]
struct NodeBlocks {
    /// block hash -> last use (a tick of the index's clock)
    blocks: FxHashMap<u64, u64>,
    /// (when, chain) of the latest routes here, replayed over an advert older than them
    recent: VecDeque<(u64, Vec<u64>)>,
}

/// The per-node prefix sets, and for each block hash the nodes that have it.
pub struct PrefixIndex {
    capacity: usize,
    slots: FxHashMap<String, u32>,
    nodes: Vec<Option<NodeBlocks>>,
    free: Vec<u32>,
    owners: FxHashMap<u64, Vec<u32>>,
    tick: u64,
}

impl Default for PrefixIndex {
    fn default() -> Self {
        Self::new(DEFAULT_BLOCKS_PER_NODE)
    }
}

impl PrefixIndex {
    /// `capacity`: blocks remembered per node (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            slots: FxHashMap::default(),
            nodes: Vec::new(),
            free: Vec::new(),
            owners: FxHashMap::default(),
            tick: 0,
        }
    }

    fn slot(&mut self, id: &str) -> u32 {
        if let Some(&s) = self.slots.get(id) {
            return s;
        }
        let s = match self.free.pop() {
            Some(s) => {
                self.nodes[s as usize] = Some(NodeBlocks::default());
                s
            }
            None => {
                self.nodes.push(Some(NodeBlocks::default()));
                (self.nodes.len() - 1) as u32
            }
        };
        self.slots.insert(id.to_owned(), s);
        s
    }

    /// Blocks indexed for `id`.
    pub fn len(&self, id: &str) -> usize {
        self.slots
            .get(id)
            .and_then(|&s| self.nodes[s as usize].as_ref())
            .map_or(0, |n| n.blocks.len())
    }

    /// Blocks indexed over all nodes.
    pub fn total(&self) -> usize {
        self.nodes.iter().flatten().map(|n| n.blocks.len()).sum()
    }

    /// A request with this chain was sent to `id` at `at_ms`: its blocks are
    /// (about to be) warm there.
    pub fn routed(&mut self, id: &str, chain: &[u64], at_ms: u64) {
        let s = self.slot(id);
        self.insert(s, chain);
        if let Some(n) = self.nodes[s as usize].as_mut() {
            if n.recent.len() == RECENT_ROUTES {
                n.recent.pop_front();
            }
            n.recent.push_back((at_ms, chain.to_vec()));
        }
    }

    /// `id` says these blocks are warm there, as of `advert_at_ms`: they
    /// replace the guess, and routes sent after the advert was taken are
    /// replayed over it (the advert cannot know them yet).
    pub fn replace(&mut self, id: &str, warm: &[u64], advert_at_ms: u64) {
        let s = self.slot(id);
        let Some(mut n) = self.nodes[s as usize].take() else {
            return;
        };
        for h in n.blocks.keys() {
            self.disown(*h, s);
        }
        n.blocks.clear();
        n.recent.retain(|(at, _)| *at > advert_at_ms);
        let replay: Vec<Vec<u64>> = n.recent.iter().map(|(_, c)| c.clone()).collect();
        self.nodes[s as usize] = Some(n);
        self.insert(s, warm);
        for c in &replay {
            self.insert(s, c);
        }
    }

    /// Forget a node (it left, or restarted with nothing warm).
    pub fn remove(&mut self, id: &str) {
        let Some(s) = self.slots.remove(id) else {
            return;
        };
        if let Some(n) = self.nodes[s as usize].take() {
            for h in n.blocks.keys() {
                self.disown(*h, s);
            }
        }
        self.free.push(s);
    }

    fn disown(&mut self, h: u64, s: u32) {
        if let Some(v) = self.owners.get_mut(&h) {
            v.retain(|&x| x != s);
            if v.is_empty() {
                self.owners.remove(&h);
            }
        }
    }

    fn insert(&mut self, s: u32, chain: &[u64]) {
        // The head of a chain gets the newest tick, so eviction drops long
        // tails first and keeps the shared heads that most requests match.
        let base = self.tick;
        self.tick += chain.len() as u64 + 1;
        let Some(n) = self.nodes[s as usize].as_mut() else {
            return;
        };
        let mut added = Vec::new();
        for (i, &h) in chain.iter().enumerate() {
            let t = base + (chain.len() - i) as u64;
            if n.blocks.insert(h, t).is_none() {
                added.push(h);
            }
        }
        let over = n.blocks.len() > self.capacity;
        for h in added {
            self.owners.entry(h).or_default().push(s);
        }
        if over {
            self.evict(s);
        }
    }

    /// Drop the oldest eighth of a node's blocks at once. A linked LRU list
    /// would do it per insert, with two pointers per block and a pointer chase
    /// per touch; a batch needs neither, costs O(n) once per n/8 inserts, and
    /// keeps `owners` in step in the same pass. (No LRU crate in the tree
    /// keeps a second map in step on eviction.)
    fn evict(&mut self, s: u32) {
        let keep = self.capacity - self.capacity / 8;
        let Some(n) = self.nodes[s as usize].as_mut() else {
            return;
        };
        let mut ticks: Vec<u64> = n.blocks.values().copied().collect();
        let cut = ticks.len() - keep;
        let (_, &mut threshold, _) = ticks.select_nth_unstable(cut);
        let mut gone = Vec::with_capacity(cut);
        n.blocks.retain(|h, t| {
            let keep = *t >= threshold;
            if !keep {
                gone.push(*h);
            }
            keep
        });
        for h in gone {
            self.disown(h, s);
        }
    }

    /// How many of `chain`'s leading blocks each node has.
    ///
    /// A node's blocks of one prompt are nested (a chain is inserted whole
    /// and evicted tail first), so the nodes owning block `d` shrink as `d`
    /// grows: each distinct match length is found by binary search over the
    /// chain, ~6 lookups for a 1,000-token prompt, instead of one lookup per
    /// block. Those lookups miss the CPU cache on a large index, and walking
    /// all 60 blocks was most of a decision's time.
    pub fn matches(&self, chain: &[u64]) -> Matches<'_> {
        let mut by_slot: FxHashMap<u32, u32> = FxHashMap::default();
        let owners_at = |d: usize| self.owners.get(&chain[d]).map_or(&[][..], Vec::as_slice);
        if chain.is_empty() {
            return Matches {
                index: self,
                by_slot,
            };
        }
        // nodes with the first block whose match length is not known yet
        let mut pending: FxHashSet<u32> = owners_at(0).iter().copied().collect();
        // every pending node's match is at most `top` blocks
        let mut top = chain.len();
        while !pending.is_empty() {
            // the deepest block below `top` some pending node owns (block 0: all do)
            let (mut lo, mut hi) = (0, top);
            while hi - lo > 1 {
                let mid = (lo + hi) / 2;
                if owners_at(mid).iter().any(|s| pending.contains(s)) {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            for s in owners_at(lo) {
                if pending.remove(s) {
                    by_slot.insert(*s, lo as u32 + 1);
                }
            }
            top = lo;
            if lo == 0 {
                break;
            }
        }
        Matches {
            index: self,
            by_slot,
        }
    }

    /// How many of `chain`'s leading blocks node `id` has.
    pub fn matched(&self, id: &str, chain: &[u64]) -> u32 {
        let Some(n) = self
            .slots
            .get(id)
            .and_then(|&s| self.nodes[s as usize].as_ref())
        else {
            return 0;
        };
        chain
            .iter()
            .take_while(|h| n.blocks.contains_key(h))
            .count() as u32
    }
}

/// A request's match on each node ([`PrefixIndex::matches`]).
pub struct Matches<'a> {
    index: &'a PrefixIndex,
    by_slot: FxHashMap<u32, u32>,
}

impl Matches<'_> {
    /// Blocks of the request's prefix node `id` has (0: none, or unknown).
    pub fn get(&self, id: &str) -> u32 {
        self.get_with_size(id).0
    }

    /// (blocks of the request's prefix node `id` has, blocks it has in all),
    /// in one lookup of the node.
    pub fn get_with_size(&self, id: &str) -> (u32, u32) {
        let Some(&s) = self.index.slots.get(id) else {
            return (0, 0);
        };
        let size = self.index.nodes[s as usize]
            .as_ref()
            .map_or(0, |n| n.blocks.len() as u32);
        (self.by_slot.get(&s).copied().unwrap_or(0), size)
    }

    /// No node has any of it.
    pub fn is_empty(&self) -> bool {
        self.by_slot.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(tenant: usize, question: usize) -> String {
        format!(
            "{}{}",
            format!("system prompt of tenant {tenant}. ").repeat(40),
            format!("question {question}?").repeat(10)
        )
    }

    #[test]
    fn equal_prefixes_hash_equal_and_models_differ() {
        let a = chain("m", &text(1, 1));
        let b = chain("m", &text(1, 2));
        let shared = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        assert!(shared >= (40 * 27) / BLOCK_BYTES - 1, "{shared}");
        assert!(shared < a.len());
        assert_ne!(chain("m", &text(1, 1))[0], chain("n", &text(1, 1))[0]);
        assert!(chain("m", "short").is_empty());
    }

    #[test]
    fn routed_blocks_match_and_removal_forgets() {
        let mut ix = PrefixIndex::new(1_000);
        let c = chain("m", &text(1, 1));
        ix.routed("a", &c, 10);
        let q = chain("m", &text(1, 2));
        let m = ix.matches(&q);
        assert_eq!(m.get("a"), ix.matched("a", &q));
        assert!(m.get("a") > 0);
        assert_eq!(m.get("b"), 0);
        ix.remove("a");
        assert!(ix.matches(&q).is_empty());
        assert!(ix.owners.is_empty());
    }

    #[test]
    fn eviction_keeps_the_bound_and_the_owners_in_step() {
        let mut ix = PrefixIndex::new(100);
        for t in 0..50 {
            ix.routed("a", &chain("m", &text(t, 0)), t as u64);
        }
        assert!(ix.len("a") <= 100);
        let owned: usize = ix.owners.values().map(Vec::len).sum();
        assert_eq!(owned, ix.len("a"));
        // the latest tenant is still matched, the first is gone
        assert!(ix.matched("a", &chain("m", &text(49, 1))) > 0);
        assert_eq!(ix.matched("a", &chain("m", &text(0, 1))), 0);
    }

    #[test]
    fn matches_agree_with_walking_each_node() {
        let mut ix = PrefixIndex::new(10_000);
        // families of prompts sharing heads of different lengths, on several nodes
        for p in 0..60 {
            let text = format!(
                "{}{}",
                "shared head. ".repeat(20 + p % 7),
                format!("body {p}. ").repeat(30)
            );
            ix.routed(&format!("n{}", p % 9), &chain("m", &text), p as u64);
        }
        for q in 0..60 {
            let text = format!(
                "{}{}",
                "shared head. ".repeat(20 + q % 7),
                format!("body {q}. ").repeat(31)
            );
            let c = chain("m", &text);
            let m = ix.matches(&c);
            for n in 0..9 {
                let id = format!("n{n}");
                assert_eq!(m.get(&id), ix.matched(&id, &c), "query {q} node {id}");
            }
        }
    }

    #[test]
    fn an_advert_replaces_the_guess_but_not_later_routes() {
        let mut ix = PrefixIndex::new(1_000);
        let old = chain("m", &text(1, 1));
        let warm = chain("m", &text(2, 1));
        let later = chain("m", &text(3, 1));
        ix.routed("a", &old, 100);
        ix.routed("a", &later, 300);
        ix.replace("a", &warm, 200);
        assert_eq!(ix.matched("a", &old), 0);
        assert_eq!(ix.matched("a", &warm) as usize, warm.len());
        assert_eq!(ix.matched("a", &later) as usize, later.len());
        // a newer advert without it: gone too
        ix.replace("a", &warm, 400);
        assert_eq!(ix.matched("a", &later), 0);
    }
}
