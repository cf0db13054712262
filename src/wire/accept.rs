//! What a node can read, announced to its peer, and the encoding chosen from two
//! announcements.
//!
//! Announcement (HTTP header [`HEADER`], both directions):
//! ```text
//! X-Clinicsync-Accept: <newest version>[;dict=<id>]*[;columns][;chain]
//!                                                 e.g. "2;dict=1;columns;chain"
//! ```
//! `columns`: the node reads v2 blocks whose bodies are shapes and columns and whose
//! push results are columns
//! ([`super::shape`]); nodes before it ignore the parameter and never get such a block.
//! `chain`: the node reads chained v2 frames ([`super::v2::encode_chained`]), and a
//! child announcing it asks the hub to keep its push payloads as prefixes. A clinic
//! announces it only while it pushes at the slow-link level (bytes cost more than
//! the memory and CPU a chain takes).
//! A node that announces nothing speaks v1 (every node before v2). Unknown
//! parameters are ignored and an unreadable value counts as v1, so a later node can
//! add to the announcement without breaking this one.

use super::{dict, PROTOCOL_V2, PROTOCOL_VERSION};

/// The HTTP header that carries an [`Accept`].
pub const HEADER: &str = "x-clinicsync-accept";
/// Longest announcement read; a longer one counts as v1.
const MAX_LEN: usize = 256;
/// Dictionaries read from one announcement.
const MAX_DICTS: usize = 16;

/// How a frame is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    V1,
    /// `dict` 0: no dictionary; `columns`: bodies as shapes and columns.
    V2 {
        dict: u32,
        columns: bool,
    },
}

/// What a node reads: the newest protocol version and the dictionaries it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accept {
    pub version: u16,
    pub dicts: Vec<u32>,
    /// Reads bodies as shapes and columns.
    pub columns: bool,
    /// Reads chained frames (and, from a child, asks for its payloads to be kept).
    pub chain: bool,
}

impl Accept {
    /// What this build reads: v2 and every shipped dictionary.
    pub fn ours() -> Accept {
        Accept {
            version: PROTOCOL_V2,
            dicts: dict::SHIPPED.iter().map(|(id, _)| *id).collect(),
            columns: true,
            chain: true,
        }
    }

    /// A node of before v2 (or one forced to behave as one).
    pub fn v1() -> Accept {
        Accept {
            version: PROTOCOL_VERSION,
            dicts: Vec::new(),
            columns: false,
            chain: false,
        }
    }

    /// v2 without any dictionary (a peer of a later build that ships none of ours).
    pub fn v2_without_dictionary() -> Accept {
        Accept {
            version: PROTOCOL_V2,
            dicts: Vec::new(),
            columns: true,
            chain: true,
        }
    }

    /// A v2 node of before `columns` (it reads bodies as text only).
    pub fn v2_bodies_as_text() -> Accept {
        Accept {
            columns: false,
            chain: false,
            ..Accept::ours()
        }
    }

    /// The header value; `None` for v1, which announces nothing (as before v2).
    pub fn header_value(&self) -> Option<String> {
        if self.version < PROTOCOL_V2 {
            return None;
        }
        let mut s = self.version.to_string();
        for d in &self.dicts {
            s.push_str(&format!(";dict={d}"));
        }
        if self.columns {
            s.push_str(";columns");
        }
        if self.chain {
            s.push_str(";chain");
        }
        Some(s)
    }

    /// Reads an announcement; absent or unreadable is v1.
    pub fn parse(value: Option<&str>) -> Accept {
        let Some(v) = value.filter(|v| v.len() <= MAX_LEN) else {
            return Accept::v1();
        };
        let mut parts = v.split(';').map(str::trim);
        let Some(version) = parts.next().and_then(|p| p.parse::<u16>().ok()) else {
            return Accept::v1();
        };
        let mut dicts = Vec::new();
        let mut columns = false;
        let mut chain = false;
        for p in parts {
            if p == "columns" {
                columns = true;
            }
            if p == "chain" {
                chain = true;
            }
            if let Some(id) = p.strip_prefix("dict=").and_then(|d| d.parse::<u32>().ok()) {
                if id != 0 && dicts.len() < MAX_DICTS && !dicts.contains(&id) {
                    dicts.push(id);
                }
            }
        }
        Accept {
            version,
            dicts,
            columns,
            chain,
        }
    }

    /// Whether frames to `peer` may be chained: both read v2 and chains.
    pub fn chains_with(&self, peer: &Accept) -> bool {
        self.chain && peer.chain && self.version.min(peer.version) >= PROTOCOL_V2
    }

    /// How to encode for `peer`, given what this node can write (`self`): v2 when
    /// both read it, with the newest dictionary both have (0 when none), bodies as
    /// columns when both read them.
    pub fn choose(&self, peer: &Accept) -> Encoding {
        if self.version.min(peer.version) < PROTOCOL_V2 {
            return Encoding::V1;
        }
        let dict = self
            .dicts
            .iter()
            .filter(|d| peer.dicts.contains(d) && dict::bytes(**d).is_some())
            .max()
            .copied()
            .unwrap_or(0);
        Encoding::V2 {
            dict,
            columns: self.columns && peer.columns,
        }
    }

    /// Whether a frame of protocol `version` is one this node reads.
    pub fn reads(&self, version: u16) -> bool {
        version <= self.version
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_round_trip_and_garbage_means_v1() {
        let ours = Accept::ours();
        let v = ours.header_value().unwrap();
        assert!(v.starts_with("2;dict="), "{v}");
        assert_eq!(Accept::parse(Some(&v)), ours);
        assert_eq!(Accept::v1().header_value(), None);
        assert_eq!(Accept::parse(None), Accept::v1());
        assert_eq!(Accept::parse(Some("two")), Accept::v1());
        assert_eq!(Accept::parse(Some(&"2".repeat(300))), Accept::v1());
        // Unknown parameters and bad ids are skipped, not fatal.
        assert_eq!(
            Accept::parse(Some("3; dict=7; zz=1; dict=x; dict=0; dict=7")),
            Accept {
                version: 3,
                dicts: vec![7],
                columns: false,
                chain: false,
            }
        );
    }

    #[test]
    fn frames_are_chained_only_between_two_v2_nodes_that_both_announce_it() {
        let ours = Accept::ours();
        assert!(ours.header_value().unwrap().ends_with(";chain"));
        assert!(ours.chains_with(&Accept::parse(Some("2;dict=1;columns;chain"))));
        // A v2 node of before chains, a v1 node, and a later version: by the flag alone.
        assert!(!ours.chains_with(&Accept::parse(Some("2;dict=1;columns"))));
        assert!(!ours.chains_with(&Accept::v1()));
        assert!(!ours.chains_with(&Accept::v2_bodies_as_text()));
        assert!(ours.chains_with(&Accept::parse(Some("3;chain"))));
        let without = Accept {
            chain: false,
            ..Accept::ours()
        };
        assert!(!without.chains_with(&ours));
    }

    #[test]
    fn the_newest_shared_dictionary_is_chosen_and_v1_wins_over_v2() {
        let ours = Accept::ours();
        assert_eq!(ours.choose(&Accept::v1()), Encoding::V1);
        assert_eq!(Accept::v1().choose(&ours), Encoding::V1);
        assert_eq!(
            ours.choose(&Accept::v2_without_dictionary()),
            Encoding::V2 {
                dict: 0,
                columns: true
            }
        );
        let newest = *ours.dicts.iter().max().unwrap();
        assert_eq!(
            ours.choose(&ours),
            Encoding::V2 {
                dict: newest,
                columns: true
            }
        );
        // A v2 peer of before columns gets bodies as text.
        assert_eq!(
            ours.choose(&Accept::v2_bodies_as_text()),
            Encoding::V2 {
                dict: newest,
                columns: false
            }
        );
        // A peer with a later dictionary we lack, and one of ours: ours is used.
        let later = Accept {
            version: 3,
            dicts: vec![newest, 999],
            columns: true,
            chain: true,
        };
        assert_eq!(
            ours.choose(&later),
            Encoding::V2 {
                dict: newest,
                columns: true
            }
        );
    }
}
