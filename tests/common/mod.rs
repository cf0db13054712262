//! Test harness: hubs served in-process over real TCP on 127.0.0.1, clinics with
//! real SQLite files and the real HTTP client, and the real binary for CLI checks.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clinicsync::client::{self, SyncError, SyncReport};
use clinicsync::config::SyncSection;
use clinicsync::engine::{self, CatchmentRule, Policy};
use clinicsync::hub::{self, HubState};
use clinicsync::model::{RecordKey, Snapshot};
use clinicsync::secret::Secret;
use clinicsync::store::Store;
use clinicsync::time::wall_ms;
use clinicsync::transport::http::HttpClient;
use clinicsync::transport::mqtt::{MqttClient, MqttSettings};
use clinicsync::transport::Exchange;
use serde_json::{json, Value};

pub const BIN: &str = env!("CARGO_BIN_EXE_clinicsync");

pub struct TestHub {
    pub url: String,
    pub port: u16,
    pub store_path: PathBuf,
    pub policy: Policy,
    pub tokens: Vec<(String, String)>,
    /// The running hub's state (to change its children as a reload would).
    pub state: Arc<HubState>,
    rt: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    mqtt_stop: Option<tokio::sync::watch::Sender<bool>>,
}

/// Clinic ids with the district that puts patients in their catchment.
pub fn hub_policy(clinics: &[(&str, &str)]) -> Policy {
    let mut p = Policy::new("hub", false);
    for (id, district) in clinics {
        p.catchment.push(CatchmentRule {
            node: id.to_string(),
            path: "address.district".into(),
            equals: district.to_string(),
        });
    }
    p
}

impl TestHub {
    pub fn start(
        dir: &Path,
        port: u16,
        policy: Policy,
        clinics: &[&str],
        max_message: usize,
    ) -> TestHub {
        TestHub::start_with(dir, port, policy, clinics, max_message, None)
    }

    /// Also serves children through the broker, as user `hub`.
    pub fn start_mqtt(
        dir: &Path,
        policy: Policy,
        clinics: &[&str],
        broker: &clinicsync::devkit::cluster::Broker,
    ) -> TestHub {
        let settings = MqttSettings::from_url(
            &broker.url(),
            "hub",
            Secret::new("hub-pass".into()),
            None,
            8 << 20,
        )
        .unwrap();
        TestHub::start_with(dir, 0, policy, clinics, 8 << 20, Some(settings))
    }

    fn start_with(
        dir: &Path,
        port: u16,
        policy: Policy,
        clinics: &[&str],
        max_message: usize,
        mqtt: Option<MqttSettings>,
    ) -> TestHub {
        let tokens: Vec<(String, String)> = clinics
            .iter()
            .map(|c| (c.to_string(), format!("token-of-{c}-0123456789")))
            .collect();
        let children = tokens
            .iter()
            .map(|(n, t)| {
                let mut h = [0u8; 32];
                hex::decode_to_slice(clinicsync::auth::token_hash(t), &mut h).unwrap();
                (n.clone(), h)
            })
            .collect();
        let store_path = dir.join("hub.db");
        let state =
            Arc::new(HubState::new(&store_path, policy.clone(), children, max_message).unwrap());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut mqtt_stop = None;
        if let Some(settings) = mqtt {
            let (tx, rx) = tokio::sync::watch::channel(false);
            rt.spawn(hub::serve_mqtt(state.clone(), settings, rx));
            mqtt_stop = Some(tx);
        }
        rt.spawn(hub::serve(listener, state.clone(), async move {
            let _ = rx.await;
        }));
        TestHub {
            url: format!("http://127.0.0.1:{port}"),
            port,
            store_path,
            policy,
            tokens,
            state,
            rt: Some(rt),
            stop: Some(tx),
            mqtt_stop,
        }
    }

    pub fn token(&self, node: &str) -> String {
        self.tokens
            .iter()
            .find(|(n, _)| n == node)
            .unwrap()
            .1
            .clone()
    }

    pub fn store(&self) -> Store {
        Store::open(&self.store_path, "hub").unwrap()
    }

    /// Writes resources at the hub as its local EMR would.
    pub fn put(&self, resources: Vec<Value>) {
        let mut s = self.store();
        let items = resources
            .into_iter()
            .map(|r| (Snapshot::from_json_value(r).unwrap(), false))
            .collect();
        engine::write_local(&mut s, &self.policy, items, wall_ms()).unwrap();
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(tx) = self.mqtt_stop.take() {
            let _ = tx.send(true);
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(std::time::Duration::from_secs(5));
        }
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        self.shutdown();
    }
}

pub struct TestClinic {
    pub id: String,
    pub store: Store,
    pub policy: Policy,
    pub client: HttpClient,
    pub mqtt: Option<MqttClient>,
    pub sync_cfg: SyncSection,
    pub config: PathBuf,
}

impl TestClinic {
    /// A clinic whose parent is `url`, with a config file the binary can use.
    pub fn new(dir: &Path, id: &str, url: &str, token: &str) -> TestClinic {
        let store_path = dir.join(format!("{id}.db"));
        let token_file = dir.join(format!("{id}.token"));
        clinicsync::filemode::write_private(&token_file, token.as_bytes()).unwrap();
        let config = dir.join(format!("{id}.toml"));
        std::fs::write(
            &config,
            format!(
                "[node]\nid = \"{id}\"\nstore = \"{}\"\n[parent]\nurl = \"{url}\"\ntoken_file = \"{}\"\n[sync]\ntimeout_secs = 10\n",
                store_path.display(),
                token_file.display()
            ),
        )
        .unwrap();
        TestClinic {
            id: id.to_string(),
            store: Store::open(&store_path, id).unwrap(),
            policy: Policy::new(id, true),
            client: HttpClient::new(
                url,
                Secret::new(token.to_string()),
                std::time::Duration::from_secs(10),
            ),
            mqtt: None,
            sync_cfg: SyncSection::default(),
            config,
        }
    }

    pub fn put(&mut self, resources: Vec<Value>) {
        let items = resources
            .into_iter()
            .map(|r| (Snapshot::from_json_value(r).unwrap(), false))
            .collect();
        engine::write_local(&mut self.store, &self.policy, items, wall_ms()).unwrap();
    }

    /// Uses MQTT (user = node id, password `<id>-pass`) instead of HTTP from now on.
    pub fn use_mqtt(&mut self, broker: &clinicsync::devkit::cluster::Broker, timeout_secs: u64) {
        self.mqtt = Some(
            mqtt_client(broker, &self.id, &format!("{}-pass", self.id), timeout_secs).unwrap(),
        );
    }

    pub fn sync(&mut self) -> Result<SyncReport, SyncError> {
        let link: &dyn Exchange = match &self.mqtt {
            Some(m) => m,
            None => &self.client,
        };
        client::sync_once(
            &mut self.store,
            &self.policy,
            link,
            &self.sync_cfg,
            &AtomicBool::new(false),
        )
    }

    pub fn get(&self, reference: &str) -> Option<Value> {
        self.store
            .current(&RecordKey::parse(reference).unwrap())
            .unwrap()
            .map(|s| s.version.snapshot.json())
    }

    /// Runs the real binary against this clinic's config.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli(&self.config, args)
    }
}

pub fn mqtt_client(
    broker: &clinicsync::devkit::cluster::Broker,
    user: &str,
    password: &str,
    timeout_secs: u64,
) -> Result<MqttClient, clinicsync::transport::http::TransportError> {
    let settings = MqttSettings::from_url(
        &broker.url(),
        user,
        Secret::new(password.to_string()),
        None,
        8 << 20,
    )
    .unwrap();
    MqttClient::connect(
        &settings,
        user,
        std::time::Duration::from_secs(timeout_secs),
    )
}

/// The binary's exit code, stdout and stderr for `args` against `config`.
pub fn run(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = cli(config, args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn cli(config: &Path, args: &[&str]) -> Output {
    std::process::Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

pub fn get(store: &Store, reference: &str) -> Option<Value> {
    store
        .current(&RecordKey::parse(reference).unwrap())
        .unwrap()
        .map(|s| s.version.snapshot.json())
}

pub fn patient(id: &str, district: &str) -> Value {
    serde_json::json!({"resourceType":"Patient","id":id,"gender":"female","address":[{"district":district}]})
}

pub fn encounter(id: &str, patient: &str) -> Value {
    serde_json::json!({"resourceType":"Encounter","id":id,"status":"finished","subject":{"reference":format!("Patient/{patient}")}})
}

/// A Patient as OpenMRS's FHIR2 renders one (OpenMRS ID at a location).
pub fn patient_om(id: &str, district: &str, gender: &str) -> serde_json::Value {
    json!({
        "resourceType": "Patient", "id": id, "active": true, "gender": gender,
        "identifier": [{"use": "official", "type": {"coding": [{"code": "05a29f94-c0ed-11e2-94be-8c13b969e334"}], "text": "OpenMRS ID"}, "value": "10001-2",
            "extension": [{"url": "http://fhir.openmrs.org/ext/patient/identifier#location", "valueReference": {"reference": "Location/loc-a"}}]}],
        "name": [{"family": "Otieno", "given": ["Amina"]}],
        "address": [{"district": district}]
    })
}

/// An Encounter as FHIR2 renders one (its type in OpenMRS's code system).
pub fn encounter_om(id: &str, patient: &str) -> serde_json::Value {
    json!({
        "resourceType": "Encounter", "id": id, "status": "unknown",
        "type": [{"coding": [{"system": "http://fhir.openmrs.org/code-system/encounter-type", "code": "67a71486-1a54-468f-ac3e-7091a9a79584", "display": "Vitals"}]}],
        "subject": {"reference": format!("Patient/{patient}"), "type": "Patient"},
        "period": {"start": "2026-11-26T10:00:00+00:00"}
    })
}

/// A weight Observation as FHIR2 renders one.
pub fn obs_om(id: &str, patient: &str, encounter: &str, kg: f64) -> serde_json::Value {
    json!({
        "resourceType": "Observation", "id": id, "status": "final",
        "code": {"coding": [{"code": "5089AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "display": "Weight (kg)"}]},
        "subject": {"reference": format!("Patient/{patient}"), "type": "Patient"},
        "encounter": {"reference": format!("Encounter/{encounter}"), "type": "Encounter"},
        "effectiveDateTime": "2026-11-26T10:00:00+00:00",
        "valueQuantity": {"value": kg, "unit": "kg"}
    })
}

// ---------------------------------------------------------------- trees of real nodes

/// A credential file, 0600 as a node requires.
pub fn credential(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    clinicsync::filemode::write_private(&p, format!("{text}\n").as_bytes()).unwrap();
    p
}

/// `[[hub.children]]` and a catchment rule for `id` (its district), and the token
/// file the child reads.
pub fn child(dir: &Path, id: &str, district: &str, descendants: &[&str]) -> (String, PathBuf) {
    let token = clinicsync::auth::new_token();
    let file = credential(dir, &format!("{id}.token"), &token);
    let desc: Vec<String> = descendants.iter().map(|d| format!("{d:?}")).collect();
    (
        format!(
            "[[hub.children]]\nnode = \"{id}\"\ntoken_sha256 = \"{}\"\ndescendants = [{}]\n\n[[hub.catchment]]\nnode = \"{id}\"\npath = \"address.district\"\nequals = \"{district}\"\n\n",
            clinicsync::auth::token_hash(&token),
            desc.join(", ")
        ),
        file,
    )
}

/// `[node]` and a `[sync]` that rounds every second.
pub fn node_section(dir: &Path, id: &str) -> String {
    format!(
        "[node]\nid = \"{id}\"\nstore = \"{}\"\nkeys_dir = \"{}\"\n\n[sync]\ninterval_secs = 1\nbackoff_min_secs = 1\nbackoff_max_secs = 2\n\n",
        dir.join(format!("{id}.db")).display(),
        dir.join(format!("{id}.keys")).display()
    )
}

pub fn parent_section(url: &str, token: &Path) -> String {
    format!(
        "[parent]\nurl = \"{url}\"\ntoken_file = \"{}\"\n\n",
        token.display()
    )
}

/// A node run as a real `clinicsync run` process, looked at through the CLI.
pub struct Node {
    pub id: &'static str,
    pub config: PathBuf,
    pub proc: Option<clinicsync::devkit::cluster::Proc>,
}

impl Node {
    pub fn start(&mut self) {
        self.proc = Some(
            clinicsync::devkit::cluster::Proc::spawn(
                Path::new(BIN),
                self.id,
                &self.config,
                &["run"],
            )
            .unwrap(),
        );
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let out = cli(&self.config, args);
        assert!(
            out.status.success(),
            "{} {args:?}: {}",
            self.id,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Live records of a kind this node's store holds.
    pub fn live(&self, kind: &str) -> Vec<String> {
        let mut ids: Vec<String> = self
            .json(&["ls", kind, "--json"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["deleted"] != true)
            .map(|r| {
                r["record"]
                    .as_str()
                    .unwrap()
                    .split_once('/')
                    .unwrap()
                    .1
                    .to_string()
            })
            .collect();
        ids.sort();
        ids
    }

    pub fn quarantine(&self) -> Vec<Value> {
        self.json(&["quarantine", "list", "--json"])
            .as_array()
            .unwrap()
            .clone()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.config.with_extension("log")).unwrap_or_default()
    }
}

/// Writes `text` as `<id>.toml` in `dir`: a node ready to start.
pub fn node(dir: &Path, id: &'static str, text: String) -> Node {
    let config = dir.join(format!("{id}.toml"));
    std::fs::write(&config, text).unwrap();
    Node {
        id,
        config,
        proc: None,
    }
}

/// Every `.rs` file under `dir`, recursively (the source scans of the layering and
/// error-taxonomy tests).
pub fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}
