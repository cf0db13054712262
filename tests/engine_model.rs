//! Model-based property test of the engine: random sequences of writes at a hub and
//! two clinics, pushes and pulls whose answers may be lost, and re-sent pushes, then
//! a drain. Checked against what must hold whatever the order:
//! - every clinic's outbox drains and nothing stays quarantined;
//! - each clinic holds exactly the hub's version of every record it may see, and
//!   nothing outside its catchment;
//! - the final version of each record causally includes every version any node ever
//!   wrote (nothing silently dropped: a losing side survives in a conflict row);
//! - every audit chain verifies.

use std::collections::BTreeMap;

use clinicsync::engine::{self, CatchmentRule, Policy};
use clinicsync::model::{Causality, RecordKey, Snapshot, VersionVector};
use clinicsync::store::{AuditCheck, Store};
use clinicsync::wire::{PushRequest, PushResponse};
use proptest::prelude::*;
use serde_json::json;

#[derive(Debug, Clone)]
enum Op {
    /// node 0 = a, 1 = b, 2 = hub; a writes North patients, b South, the hub either.
    Write {
        node: usize,
        patient: usize,
        field: usize,
    },
    Push {
        clinic: usize,
        lose_answer: bool,
    },
    Pull {
        clinic: usize,
        lose_answer: bool,
    },
    RepeatLastPush {
        clinic: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 0..3usize, 0..3usize).prop_map(|(node, patient, field)| Op::Write { node, patient, field }),
        3 => (0..2usize, proptest::bool::weighted(0.3)).prop_map(|(clinic, lose_answer)| Op::Push { clinic, lose_answer }),
        3 => (0..2usize, proptest::bool::weighted(0.3)).prop_map(|(clinic, lose_answer)| Op::Pull { clinic, lose_answer }),
        1 => (0..2usize).prop_map(|clinic| Op::RepeatLastPush { clinic }),
    ]
}

struct World {
    _dir: tempfile::TempDir,
    stores: Vec<Store>,
    policies: Vec<Policy>,
    now: u64,
    token: u64,
    last_push: [Option<PushRequest>; 2],
    /// Every version vector any node produced, per record.
    produced: BTreeMap<String, Vec<VersionVector>>,
}

const NAMES: [&str; 3] = ["a", "b", "hub"];
const DISTRICT: [&str; 2] = ["North", "South"];

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let stores = NAMES
            .iter()
            .map(|n| Store::open(&dir.path().join(format!("{n}.db")), n).unwrap())
            .collect();
        let mut hub = Policy::new("hub", false);
        for (i, d) in DISTRICT.iter().enumerate() {
            hub.catchment.push(CatchmentRule {
                node: NAMES[i].into(),
                path: "address.district".into(),
                equals: d.to_string(),
            });
        }
        World {
            _dir: dir,
            stores,
            policies: vec![Policy::new("a", true), Policy::new("b", true), hub],
            now: 1_000,
            token: 0,
            last_push: [None, None],
            produced: BTreeMap::new(),
        }
    }

    fn tick(&mut self) -> u64 {
        self.now += 7;
        self.now
    }

    fn write(&mut self, node: usize, patient: usize, field: usize) {
        // Clinics write their own district's patients; the hub writes any.
        let district = if node == 2 { patient % 2 } else { node };
        let id = format!("p{}-{}", DISTRICT[district], patient);
        let key = RecordKey::new("Patient", &id).unwrap();
        let mut body = self.stores[node]
            .current(&key)
            .unwrap()
            .map(|s| s.version.snapshot.json())
            .unwrap_or_else(|| json!({"resourceType":"Patient","id":id,"address":[{"district":DISTRICT[district]}]}));
        self.token += 1;
        body[format!("f{field}")] = json!(format!("{}-{}", NAMES[node], self.token));
        let now = self.tick();
        engine::write_local(
            &mut self.stores[node],
            &self.policies[node],
            vec![(Snapshot::from_json_value(body).unwrap(), false)],
            now,
        )
        .unwrap();
        let vv = self.stores[node].current(&key).unwrap().unwrap().version.vv;
        self.produced.entry(key.to_string()).or_default().push(vv);
    }

    fn hub_push(&mut self, clinic: usize, req: PushRequest) -> PushResponse {
        let now = self.tick();
        let (hub, policy) = (&mut self.stores[2], &self.policies[2]);
        let resp = engine::handle_push(hub, policy, NAMES[clinic], req.clone(), now).unwrap();
        // What the hub resolved in a conflict is a version too.
        for r in &resp.results {
            let sent = &req.records[r.i as usize];
            let key = format!("{}/{}", sent.kind, sent.id);
            if let Some(s) = hub.current(&RecordKey::parse(&key).unwrap()).unwrap() {
                self.produced.entry(key).or_default().push(s.version.vv);
            }
        }
        resp
    }

    fn push(&mut self, clinic: usize, lose_answer: bool) {
        let now = self.tick();
        let Some(req) = engine::next_push(&self.stores[clinic], now, 3, 1 << 20).unwrap() else {
            return;
        };
        self.last_push[clinic] = Some(req.clone());
        let resp = self.hub_push(clinic, req.clone());
        if !lose_answer {
            engine::apply_push_results(
                &mut self.stores[clinic],
                "parent",
                &req,
                &resp,
                (0, 0),
                now,
            )
            .unwrap();
        }
    }

    fn repeat_push(&mut self, clinic: usize) {
        if let Some(req) = self.last_push[clinic].clone() {
            let resp = self.hub_push(clinic, req.clone());
            let now = self.tick();
            engine::apply_push_results(
                &mut self.stores[clinic],
                "parent",
                &req,
                &resp,
                (0, 0),
                now,
            )
            .unwrap();
        }
    }

    fn pull(&mut self, clinic: usize, lose_answer: bool) -> bool {
        let now = self.tick();
        let req = engine::pull_request(&self.stores[clinic], "parent", 4, 1 << 20).unwrap();
        let resp =
            engine::handle_pull(&self.stores[2], &self.policies[2], NAMES[clinic], &req).unwrap();
        if lose_answer {
            return true;
        }
        engine::store_pull(&mut self.stores[clinic], "parent", &resp, (0, 0), now).unwrap();
        let (store, policy) = (&mut self.stores[clinic], &self.policies[clinic]);
        engine::apply_inbox(store, policy, now).unwrap();
        for s in store.list(None).unwrap() {
            self.produced
                .entry(s.version.key().to_string())
                .or_default()
                .push(s.version.vv);
        }
        resp.more
    }

    fn drain(&mut self) {
        for _ in 0..12 {
            for c in 0..2 {
                for _ in 0..50 {
                    if self.stores[c].counts().unwrap().outbox == 0 {
                        break;
                    }
                    self.push(c, false);
                }
                while self.pull(c, false) {}
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn any_interleaving_converges_without_losing_a_write(ops in proptest::collection::vec(op(), 1..45)) {
        let mut w = World::new();
        for op in &ops {
            match *op {
                Op::Write { node, patient, field } => w.write(node, patient, field),
                Op::Push { clinic, lose_answer } => w.push(clinic, lose_answer),
                Op::Pull { clinic, lose_answer } => { w.pull(clinic, lose_answer); }
                Op::RepeatLastPush { clinic } => w.repeat_push(clinic),
            }
        }
        w.drain();
        let hub = w.stores[2].list(None).unwrap();
        for c in 0..2 {
            let counts = w.stores[c].counts().unwrap();
            prop_assert_eq!(counts.outbox, 0, "outbox of {} drains", NAMES[c]);
            prop_assert_eq!(counts.quarantine, 0);
            let mine: Vec<_> = w.stores[c].list(None).unwrap();
            let visible: Vec<_> = hub.iter().filter(|s| s.version.key().id.contains(DISTRICT[c])).collect();
            prop_assert_eq!(mine.len(), visible.len(), "{} holds exactly its catchment", NAMES[c]);
            for (m, h) in mine.iter().zip(visible.iter()) {
                prop_assert_eq!(m.version.key(), h.version.key());
                prop_assert_eq!(&m.version.vv, &h.version.vv, "{} converged on {}", NAMES[c], m.version.key());
                prop_assert_eq!(m.version.snapshot.hash, h.version.snapshot.hash);
            }
        }
        for s in &hub {
            for vv in w.produced.get(&s.version.key().to_string()).into_iter().flatten() {
                let rel = s.version.vv.compare(vv);
                prop_assert!(matches!(rel, Causality::Newer | Causality::Same),
                    "final {} of {} does not include produced {}", s.version.vv, s.version.key(), vv);
            }
        }
        for store in &w.stores {
            for c in store.conflicts_list(true, None).unwrap() {
                if c.lost_at.is_empty() {
                    prop_assert!(c.local_body.is_some() && c.remote_body.is_some());
                } else {
                    // A clinic's note that its version lost at the hub: its own side is
                    // kept; the winner is in the replica (and both sides at the hub).
                    prop_assert!(c.local_body.is_some());
                }
            }
            let intact = matches!(store.verify_audit().unwrap(), AuditCheck::Intact { .. });
            prop_assert!(intact);
        }
    }
}
