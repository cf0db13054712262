//! The payloads a hub keeps so that each child's next push can be a chained frame
//! ([`super::v2::encode_chained`]): per child the last [`PER_PEER`] push payloads it
//! decoded from requests that announced `chain`, each for at most [`TTL`], all of
//! them within [`BUDGET`] bytes (the oldest goes first). Losing one costs the child
//! one frame sent again unchained (the hub answers 412), never a record.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::v2::Prefix;

/// Payloads kept per child: the last answered push, and the one before it (a push
/// whose answer was lost refers to that one when it is sent again).
pub const PER_PEER: usize = 2;
/// How long a payload is kept: a clinic on a slow link pushes every few minutes.
pub const TTL: Duration = Duration::from_secs(3600);
/// Bytes kept for all children together.
pub const BUDGET: usize = 64 << 20;

#[derive(Default)]
pub struct Kept {
    by_peer: HashMap<String, VecDeque<(Prefix, Instant)>>,
    bytes: usize,
}

impl Kept {
    /// Keeps `prefix` as `peer`'s newest payload, letting the oldest go as needed.
    pub fn keep(&mut self, peer: &str, prefix: Prefix, now: Instant) {
        self.expire(now);
        let size = prefix.payload.len();
        if size > BUDGET {
            return;
        }
        let list = self.by_peer.entry(peer.to_string()).or_default();
        if list.iter().any(|(p, _)| p.id == prefix.id) {
            return;
        }
        list.push_back((prefix, now));
        self.bytes += size;
        if list.len() > PER_PEER {
            if let Some((old, _)) = list.pop_front() {
                self.bytes -= old.payload.len();
            }
        }
        while self.bytes > BUDGET {
            if !self.drop_oldest() {
                break;
            }
        }
    }

    /// `peer`'s kept payload named `id`, if still held.
    pub fn find(&mut self, peer: &str, id: &[u8; 8], now: Instant) -> Option<Arc<Vec<u8>>> {
        self.expire(now);
        self.by_peer
            .get(peer)?
            .iter()
            .find(|(p, _)| &p.id == id)
            .map(|(p, _)| p.payload.clone())
    }

    /// Bytes kept now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn expire(&mut self, now: Instant) {
        let mut freed = 0;
        self.by_peer.retain(|_, list| {
            list.retain(|(p, at)| {
                let keep = now.saturating_duration_since(*at) < TTL;
                if !keep {
                    freed += p.payload.len();
                }
                keep
            });
            !list.is_empty()
        });
        self.bytes -= freed;
    }

    /// Lets the oldest payload of all go; false when nothing is kept.
    fn drop_oldest(&mut self) -> bool {
        let Some(peer) = self
            .by_peer
            .iter()
            .filter_map(|(peer, list)| list.front().map(|(_, at)| (peer.clone(), *at)))
            .min_by_key(|(_, at)| *at)
            .map(|(peer, _)| peer)
        else {
            return false;
        };
        if let Some(list) = self.by_peer.get_mut(&peer) {
            if let Some((old, _)) = list.pop_front() {
                self.bytes -= old.payload.len();
            }
            if list.is_empty() {
                self.by_peer.remove(&peer);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(n: u8, len: usize) -> Prefix {
        Prefix::of(vec![n; len]).unwrap()
    }

    #[test]
    fn a_peer_keeps_its_last_two_and_finds_only_its_own() {
        let mut k = Kept::default();
        let t = Instant::now();
        let (a, b, c) = (prefix(1, 10), prefix(2, 10), prefix(3, 10));
        k.keep("clinic-a", a.clone(), t);
        k.keep("clinic-a", b.clone(), t);
        k.keep("clinic-a", c.clone(), t);
        assert!(
            k.find("clinic-a", &a.id, t).is_none(),
            "the third pushed out the first"
        );
        assert!(k.find("clinic-a", &b.id, t).is_some());
        assert!(k.find("clinic-a", &c.id, t).is_some());
        assert!(
            k.find("clinic-b", &c.id, t).is_none(),
            "another child's payload"
        );
        assert_eq!(k.bytes(), 20);
        assert!(k.find("clinic-a", &c.id, t + TTL).is_none(), "expired");
        assert_eq!(k.bytes(), 0);
    }

    #[test]
    fn the_budget_lets_the_oldest_of_all_peers_go() {
        let mut k = Kept::default();
        let t = Instant::now();
        // Larger than one chain payload may be, to reach the budget in three.
        let big = |n: u8| Prefix {
            id: [n; 8],
            payload: Arc::new(vec![n; BUDGET / 2]),
        };
        let (a, b, c) = (big(1), big(2), big(3));
        k.keep("clinic-a", a.clone(), t);
        k.keep("clinic-b", b.clone(), t + Duration::from_secs(1));
        k.keep("clinic-c", c.clone(), t + Duration::from_secs(2));
        assert!(k.bytes() <= BUDGET);
        let now = t + Duration::from_secs(3);
        assert!(k.find("clinic-a", &a.id, now).is_none(), "oldest let go");
        assert!(k.find("clinic-b", &b.id, now).is_some());
        assert!(k.find("clinic-c", &c.id, now).is_some());
    }
}
