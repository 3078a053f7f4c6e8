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

use rustc_hash::{FxHashMap, FxHasher};

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
    let mut out = Vec::with_capacity(text.len() / BLOCK_BYTES);
    chain_into(model, text, &mut out);
    out
}

/// [`chain`] into `out` (cleared first), reusing its allocation.
pub fn chain_into(model: &str, text: &str, out: &mut Vec<u64>) {
    out.clear();
    let mut seed = FxHasher::default();
    seed.write(model.as_bytes());
    seed.write_u8(0xff);
    let mut prev = seed.finish();
    for block in text.as_bytes().chunks_exact(BLOCK_BYTES) {
        let mut h = FxHasher::default();
        h.write_u64(prev);
        h.write(block);
        prev = h.finish();
        out.push(prev);
    }
}

#[derive(Default)]
struct NodeBlocks {
    /// block hash -> last use (a tick of the index's clock)
    blocks: FxHashMap<u64, u64>,
    /// (when, chain) of the latest routes here, replayed over an advert older than them
    recent: VecDeque<(u64, Vec<u64>)>,
}

/// The per-node prefix sets, and for each block hash the nodes that have it.
///
/// Nodes are small integers the caller hands out (the router's node slots),
/// so a decision reads a node's match from a dense array instead of hashing
/// its id: with 1,000 candidates, one string lookup each was most of a
/// decision's time.
pub struct PrefixIndex {
    capacity: usize,
    nodes: Vec<NodeBlocks>,
    owners: FxHashMap<u64, Vec<u32>>,
    tick: u64,
    /// Bumped by every change, so [`PrefixIndex::last_match`] knows whether the
    /// last [`PrefixIndex::compute`] still holds.
    generation: u64,
    computed_at: u64,
    /// Scratch of [`PrefixIndex::compute`], per node: `pending[s] == epoch`
    /// while its match is searched, `done[s] == epoch` once `len[s]` holds it.
    /// Epoch stamps instead of clearing: a decision touches only the nodes
    /// that own the prompt's first block, and allocates nothing.
    epoch: u32,
    pending: Vec<u32>,
    done: Vec<u32>,
    len: Vec<u32>,
    /// Reused buffers of `insert` and `evict`.
    added: Vec<u64>,
    ticks: Vec<u64>,
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
            nodes: Vec::new(),
            owners: FxHashMap::default(),
            tick: 0,
            generation: 0,
            computed_at: u64::MAX,
            epoch: 0,
            pending: Vec::new(),
            done: Vec::new(),
            len: Vec::new(),
            added: Vec::new(),
            ticks: Vec::new(),
        }
    }

    fn node_mut(&mut self, s: u32) -> &mut NodeBlocks {
        let s = s as usize;
        if self.nodes.len() <= s {
            self.nodes.resize_with(s + 1, NodeBlocks::default);
            self.pending.resize(s + 1, 0);
            self.done.resize(s + 1, 0);
            self.len.resize(s + 1, 0);
        }
        &mut self.nodes[s]
    }

    /// Blocks indexed for node `s`.
    pub fn len(&self, s: u32) -> usize {
        self.nodes.get(s as usize).map_or(0, |n| n.blocks.len())
    }

    /// Blocks indexed over all nodes.
    pub fn total(&self) -> usize {
        self.nodes.iter().map(|n| n.blocks.len()).sum()
    }

    /// A request with this chain was sent to node `s` at `at_ms`: its blocks
    /// are (about to be) warm there.
    pub fn routed(&mut self, s: u32, chain: &[u64], at_ms: u64) {
        self.insert(s, chain);
        let n = self.node_mut(s);
        // the oldest entry's buffer is reused: no allocation once full
        let mut kept = if n.recent.len() == RECENT_ROUTES {
            n.recent.pop_front().map(|(_, v)| v).unwrap_or_default()
        } else {
            Vec::with_capacity(chain.len())
        };
        kept.clear();
        kept.extend_from_slice(chain);
        n.recent.push_back((at_ms, kept));
    }

    /// Node `s` says these blocks are warm there, as of `advert_at_ms`: they
    /// replace the guess, and routes sent after the advert was taken are
    /// replayed over it (the advert cannot know them yet).
    pub fn replace(&mut self, s: u32, warm: &[u64], advert_at_ms: u64) {
        self.clear(s);
        let n = self.node_mut(s);
        n.recent.retain(|(at, _)| *at > advert_at_ms);
        let replay = std::mem::take(&mut n.recent);
        self.insert(s, warm);
        for (_, c) in &replay {
            self.insert(s, c);
        }
        self.node_mut(s).recent = replay;
    }

    /// Forget node `s` (it left, or restarted with nothing warm).
    pub fn remove(&mut self, s: u32) {
        self.clear(s);
        self.node_mut(s).recent.clear();
    }

    fn clear(&mut self, s: u32) {
        self.generation += 1;
        let blocks = std::mem::take(&mut self.node_mut(s).blocks);
        for h in blocks.keys() {
            self.disown(*h, s);
        }
        let mut blocks = blocks;
        blocks.clear();
        self.nodes[s as usize].blocks = blocks;
    }

    fn disown(&mut self, h: u64, s: u32) {
        if let Some(v) = self.owners.get_mut(&h) {
            if let Some(i) = v.iter().position(|&x| x == s) {
                v.swap_remove(i);
            }
            if v.is_empty() {
                self.owners.remove(&h);
            }
        }
    }

    fn insert(&mut self, s: u32, chain: &[u64]) {
        self.generation += 1;
        // The head of a chain gets the newest tick, so eviction drops long
        // tails first and keeps the shared heads that most requests match.
        let base = self.tick;
        self.tick += chain.len() as u64 + 1;
        let mut added = std::mem::take(&mut self.added);
        added.clear();
        let n = self.node_mut(s);
        for (i, &h) in chain.iter().enumerate() {
            let t = base + (chain.len() - i) as u64;
            if n.blocks.insert(h, t).is_none() {
                added.push(h);
            }
        }
        let over = n.blocks.len() > self.capacity;
        for &h in &added {
            self.owners.entry(h).or_default().push(s);
        }
        self.added = added;
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
        let mut ticks = std::mem::take(&mut self.ticks);
        let mut gone = std::mem::take(&mut self.added);
        ticks.clear();
        gone.clear();
        let n = &mut self.nodes[s as usize];
        ticks.extend(n.blocks.values().copied());
        let cut = ticks.len() - keep;
        let (_, &mut threshold, _) = ticks.select_nth_unstable(cut);
        n.blocks.retain(|h, t| {
            let keep = *t >= threshold;
            if !keep {
                gone.push(*h);
            }
            keep
        });
        for &h in &gone {
            self.disown(h, s);
        }
        self.ticks = ticks;
        self.added = gone;
    }

    /// Find how many of `chain`'s leading blocks each node has; read them with
    /// [`PrefixIndex::last_match`]. Allocates nothing.
    ///
    /// A node's blocks of one prompt are nested (a chain is inserted whole
    /// and evicted tail first), so the nodes owning block `d` shrink as `d`
    /// grows: each distinct match length is found by binary search over the
    /// chain, ~6 lookups in the global block -> nodes index for a 1,000-token
    /// prompt, instead of one lookup per block and node. Those lookups miss
    /// the CPU cache on a large index, and walking all 60 blocks was most of
    /// a decision's time. A node's match is then one array read.
    pub fn compute(&mut self, chain: &[u64]) {
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.pending.iter_mut().for_each(|x| *x = 0);
            self.done.iter_mut().for_each(|x| *x = 0);
            self.epoch = 1;
        }
        self.computed_at = self.generation;
        let e = self.epoch;
        let owners = &self.owners;
        let owners_at = |d: usize| owners.get(&chain[d]).map_or(&[][..], Vec::as_slice);
        let Some(&head) = chain.first() else {
            return;
        };
        let Some(first) = owners.get(&head) else {
            return;
        };
        // nodes with the first block whose match length is not known yet
        let mut waiting = 0usize;
        for &s in first {
            self.pending[s as usize] = e;
            waiting += 1;
        }
        // every pending node's match is at most `top` blocks
        let mut top = chain.len();
        while waiting > 0 {
            // the deepest block below `top` some pending node owns (block 0: all do)
            let (mut lo, mut hi) = (0, top);
            while hi - lo > 1 {
                let mid = (lo + hi) / 2;
                if owners_at(mid)
                    .iter()
                    .any(|&s| self.pending[s as usize] == e)
                {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            for &s in owners_at(lo) {
                let s = s as usize;
                if self.pending[s] == e {
                    self.pending[s] = 0;
                    self.done[s] = e;
                    self.len[s] = lo as u32 + 1;
                    waiting -= 1;
                }
            }
            top = lo;
            if lo == 0 {
                break;
            }
        }
    }

    /// Node `s`'s match found by the last [`PrefixIndex::compute`], or None
    /// when the index changed since.
    pub fn last_match(&self, s: u32) -> Option<u32> {
        if self.computed_at != self.generation {
            return None;
        }
        let s = s as usize;
        Some(if self.done.get(s) == Some(&self.epoch) {
            self.len[s]
        } else {
            0
        })
    }

    /// How many of `chain`'s leading blocks node `s` has, by walking its set.
    pub fn matched(&self, s: u32, chain: &[u64]) -> u32 {
        let Some(n) = self.nodes.get(s as usize) else {
            return 0;
        };
        chain
            .iter()
            .take_while(|h| n.blocks.contains_key(h))
            .count() as u32
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
        ix.routed(0, &c, 10);
        let q = chain("m", &text(1, 2));
        ix.compute(&q);
        assert_eq!(ix.last_match(0), Some(ix.matched(0, &q)));
        assert!(ix.matched(0, &q) > 0);
        assert_eq!(ix.last_match(1), Some(0));
        ix.remove(0);
        assert_eq!(ix.last_match(0), None, "the index changed since");
        ix.compute(&q);
        assert_eq!(ix.last_match(0), Some(0));
        assert!(ix.owners.is_empty());
    }

    #[test]
    fn eviction_keeps_the_bound_and_the_owners_in_step() {
        let mut ix = PrefixIndex::new(100);
        for t in 0..50 {
            ix.routed(0, &chain("m", &text(t, 0)), t as u64);
        }
        assert!(ix.len(0) <= 100);
        let owned: usize = ix.owners.values().map(Vec::len).sum();
        assert_eq!(owned, ix.len(0));
        // the latest tenant is still matched, the first is gone
        assert!(ix.matched(0, &chain("m", &text(49, 1))) > 0);
        assert_eq!(ix.matched(0, &chain("m", &text(0, 1))), 0);
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
            ix.routed(p as u32 % 9, &chain("m", &text), p as u64);
        }
        for q in 0..60 {
            let text = format!(
                "{}{}",
                "shared head. ".repeat(20 + q % 7),
                format!("body {q}. ").repeat(31)
            );
            let c = chain("m", &text);
            ix.compute(&c);
            for n in 0..9 {
                assert_eq!(
                    ix.last_match(n),
                    Some(ix.matched(n, &c)),
                    "query {q} node {n}"
                );
            }
        }
    }

    #[test]
    fn an_advert_replaces_the_guess_but_not_later_routes() {
        let mut ix = PrefixIndex::new(1_000);
        let old = chain("m", &text(1, 1));
        let warm = chain("m", &text(2, 1));
        let later = chain("m", &text(3, 1));
        ix.routed(0, &old, 100);
        ix.routed(0, &later, 300);
        ix.replace(0, &warm, 200);
        assert_eq!(ix.matched(0, &old), 0);
        assert_eq!(ix.matched(0, &warm) as usize, warm.len());
        assert_eq!(ix.matched(0, &later) as usize, later.len());
        // a newer advert without it: gone too
        ix.replace(0, &warm, 400);
        assert_eq!(ix.matched(0, &later), 0);
    }
}
