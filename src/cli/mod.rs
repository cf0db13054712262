//! The command line: every command a technician types over SSH. Commands read the
//! store directly (WAL lets them run beside the daemon) and answer fast; listings
//! also come as `--json`.
//!
//! Every human (non-JSON) output passes text that may come from a peer, an EMR or a
//! file through [`crate::textsafe::safe`], so no terminal escape sequence or forged
//! line reaches the technician; `--json` output is escaped by serde_json.
//!
//! Exit codes: [`EXIT_CODES`] is the one list; `--help` ([`exit_codes_help`]) and
//! the README's table ([`exit_codes_markdown`], checked by a test) come from it.

use crate::time::fmt_time;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use clap::{Parser, Subcommand};
use serde_json::json;

use crate::client;
use crate::config::{self, Config};
use crate::daemon;
use crate::engine::{self, PARENT};
use crate::error::{Classify, ErrorClass};
use crate::model::{RecordKey, Snapshot};
use crate::store::{meta, AuditCheck, CatchmentReason, Stage, Store};
use crate::textsafe::{safe, safe_display, safe_lines};
use crate::time::wall_ms;
use crate::transport::http::HttpClient;
use crate::wire::Message;

pub mod catchment;
pub mod children;
pub mod demo;
pub mod doctor;
pub mod fleet;

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_CONFIG: u8 = 3;
pub const EXIT_STORE: u8 = 4;
pub const EXIT_LINK: u8 = 5;
pub const EXIT_AUDIT: u8 = 6;
pub const EXIT_NOT_FOUND: u8 = 7;
pub const EXIT_BUNDLE: u8 = 8;
/// `fleet`: a node below this hub needs a person.
pub const EXIT_ATTENTION: u8 = 9;
/// Corruption anywhere ([`ErrorClass::Corruption`]): data this node stored or signed
/// is not what was written.
pub const EXIT_CORRUPT: u8 = 10;

/// Every exit code and what it means: the source of `--help`'s list and the
/// README's table.
///
/// An error reaching this edge is mapped by its class ([`crate::error::Classify`],
/// [`Failure::classified`]): corruption anywhere is [`EXIT_CORRUPT`], a failure worth
/// retrying as it is (link down or cut, parent or store busy) is [`EXIT_LINK`], and a
/// permanent one keeps the code of what it is about (configuration, store, bundle…).
pub const EXIT_CODES: &[(u8, &str)] = &[
    (EXIT_OK, "success"),
    (EXIT_FAILURE, "failure (the message says what; `doctor` found a FAIL)"),
    (EXIT_USAGE, "usage: an unknown command or option, or a bad argument"),
    (EXIT_CONFIG, "invalid configuration (or a missing key or credential file)"),
    (EXIT_STORE, "store problem: missing (typo in node.store), owned by another user, from a newer version or another node"),
    (EXIT_LINK, "parent unreachable or refused (link, DNS, TLS, credential, HTTP error), or anything else worth retrying as it is (parent or store busy)"),
    (EXIT_AUDIT, "audit chain broken"),
    (EXIT_NOT_FOUND, "not found (record, conflict, child, quarantined record)"),
    (EXIT_BUNDLE, "USB bundle refused (tampered, truncated, untrusted, not for this node, replayed) or not writable"),
    (EXIT_ATTENTION, "`fleet`: a node below this hub needs a person"),
    (EXIT_CORRUPT, "corruption: data this node stored or signed is not what was written (a store value, a damaged database file, a key file; the message names it). It stopped there: keep the file, restore a backup (`clinicsync restore`)"),
];

/// The exit codes for `--help`.
pub fn exit_codes_help() -> String {
    let mut s = String::from("Exit codes:\n");
    for (code, meaning) in EXIT_CODES {
        s.push_str(&format!("  {code:>2}  {meaning}\n"));
    }
    s.push_str(
        "\nEach command has examples: clinicsync help <command>, or man clinicsync-<command>.",
    );
    s
}

/// The exit codes as the README's Markdown table.
pub fn exit_codes_markdown() -> String {
    let mut s = String::from("| code | meaning |\n|---|---|\n");
    for (code, meaning) in EXIT_CODES {
        s.push_str(&format!("| {code} | {meaning} |\n"));
    }
    s
}

#[derive(Parser, Debug)]
#[command(
    name = "clinicsync",
    version,
    about = "Store-and-forward sync of OpenMRS/FHIR records between clinics and hubs",
    after_help = exit_codes_help()
)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, short, global = true, env = "CLINICSYNC_CONFIG", default_value = config::DEFAULT_PATH)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the node: serve children and/or sync with the parent until SIGTERM.
    #[command(
        after_long_help = "Installed from the .deb, the service runs it (journald logs):
  sudo systemctl enable --now clinicsync
  journalctl -u clinicsync -f

Examples:
  sudo -u clinicsync clinicsync run             # in the foreground, with /etc/clinicsync/clinicsync.toml
  sudo -u clinicsync clinicsync -c /srv/hub.toml run"
    )]
    Run,
    /// Queue depths, quarantine and conflict counts, last push/pull, cursor lag.
    #[command(after_long_help = "Examples:
  sudo -u clinicsync clinicsync status          # every field is explained in the README
  sudo -u clinicsync clinicsync status --json | jq .conflicts_lost")]
    Status {
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Hub: every node below it (grandchildren too), worst first, with what is wrong
    /// in words; exit code 9 when one needs a person.
    #[command(
        after_help = "Each exchange carries the node's health report (outbox, quarantine and its top reasons, open conflicts, EMR and link errors, disk, clock skew, version); a district hub passes its nodes' reports up.\n\nExamples:\n  clinicsync fleet\n  clinicsync fleet --silent-after 6h --json"
    )]
    Fleet {
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
        /// A node not heard from for longer than this is flagged: 90s, 30m, 24h, 2d.
        #[arg(long, default_value = "24h", value_parser = fleet::parse_duration_ms)]
        silent_after: u64,
    },
    /// Hub: fix a child from here. The order travels down with the child's next
    /// pull (or USB return bundle), runs there once, and its result comes back.
    #[command(
        after_help = "Examples:\n  clinicsync remote clinic-a quarantine retry Patient/9f2c…\n  clinicsync remote clinic-a quarantine retry --all\n  clinicsync remote clinic-a quarantine drop Observation/77ab…\n  clinicsync remote clinic-a resync\n  clinicsync remote clinic-a diagnostics\n  clinicsync remote clinic-a list\n  clinicsync remote clinic-a show <order-id>\n\nA clinic with node.remote_orders = false answers every order \"refused\"."
    )]
    Remote {
        /// A child of this hub (a node further down: order it at its district hub).
        node: String,
        #[command(subcommand)]
        action: RemoteCmd,
    },
    /// Check config, store, disk, keys, parent, credential, TLS (certificates, plain
    /// HTTP leaving the machine), clock and broker.
    #[command(after_long_help = "Examples:
  sudo -u clinicsync clinicsync doctor          # OK/WARN/FAIL per check, with hints; exit 1 on a FAIL
  sudo -u clinicsync clinicsync doctor --json")]
    Doctor {
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write the man page or shell completions (used when packaging).
    #[command(hide = true)]
    Generate {
        /// `man`, `completions` or `exit-codes` (the README's table)
        what: String,
        dir: PathBuf,
    },
    /// Push and pull once now, and print what moved.
    #[command(
        after_long_help = "Push frames are compressed at the zstd level the link pays for: with
sync.push_level = \"auto\" (the default) level 15 on a slow upload (as measured by
earlier exchanges and kept in the store), level 3 on a fast one or before anything
was measured; a number from 1 to 19 fixes it. --json shows push_level and
upload_bps.

Examples:
  sudo -u clinicsync clinicsync sync            # one round now; the daemon may keep running
  sudo -u clinicsync clinicsync sync --bootstrap  # first pull of a new or wiped clinic, with a progress bar"
    )]
    Sync {
        /// The round's report as JSON (what moved, bytes, push level, upload rate).
        #[arg(long)]
        json: bool,
        /// The first pull of a new or wiped clinic (all metadata and its catchment):
        /// a progress bar with ETA on a terminal; resumes where it stopped if cut.
        #[arg(long)]
        bootstrap: bool,
    },
    /// Write FHIR resources (a resource or a Bundle, JSON) into this node's store.
    #[command(after_long_help = "Examples:
  sudo -u clinicsync clinicsync put patient.json
  sudo -u clinicsync clinicsync put bundle-from-the-emr.json more/*.json")]
    Put {
        /// JSON files, each a FHIR resource or a Bundle of them.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the current version of a record as FHIR JSON.
    #[command(after_long_help = "Examples:
  sudo -u clinicsync clinicsync get Patient/5b0c…
  sudo -u clinicsync clinicsync get Observation/77ab… | jq .valueQuantity")]
    Get {
        /// The record, as `Kind/id` (e.g. Patient/5b0c…).
        record: String,
    },
    /// List records held here, optionally of one kind.
    #[command(after_long_help = "Examples:
  sudo -u clinicsync clinicsync ls Patient
  sudo -u clinicsync clinicsync ls --json | jq length")]
    Ls {
        /// Only records of this FHIR kind (e.g. Patient, Encounter).
        kind: Option<String>,
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Delete a record (a tombstone that syncs like any other version).
    #[command(after_long_help = "Examples:
  sudo -u clinicsync clinicsync delete Observation/77ab…   # its history keeps every version")]
    Delete {
        /// The record, as `Kind/id`.
        record: String,
    },
    /// Ask the parent for records on demand (refused outside this node's catchment).
    #[command(after_long_help = "Examples:
  sudo -u clinicsync clinicsync fetch Patient/5b0c… Encounter/e1")]
    Fetch {
        /// Records, each as `Kind/id`.
        #[arg(required = true)]
        records: Vec<String>,
    },
    /// Records that could not be delivered or applied.
    #[command(after_long_help = "Examples:
  sudo -u clinicsync clinicsync quarantine list
  sudo -u clinicsync clinicsync quarantine show Patient/5b0c…
  sudo -u clinicsync clinicsync quarantine retry --all")]
    Quarantine {
        #[command(subcommand)]
        action: QuarantineCmd,
    },
    /// Concurrent edits and how they were resolved.
    #[command(after_long_help = "Examples:
  sudo -u clinicsync clinicsync conflicts list  # includes edits of this clinic that lost at the hub
  sudo -u clinicsync clinicsync conflicts show 3")]
    Conflicts {
        #[command(subcommand)]
        action: ConflictsCmd,
    },
    /// Every version of a record this node has seen: when, from where, what changed.
    #[command(after_long_help = "Examples:
  sudo -u clinicsync clinicsync history Patient/5b0c…        # oldest first: local edits, pulls, pushes, stale copies, conflicts
  sudo -u clinicsync clinicsync history Encounter/e1 --json  # each version's vector, clock, hash and changed fields")]
    History {
        /// The record, as `Kind/id` (e.g. Patient/5b0c…).
        record: String,
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The tamper-evident audit log.
    #[command(after_long_help = "Examples:
  sudo -u clinicsync clinicsync audit verify    # exit 0 when the chain is intact, else names the first bad row
  sudo -u clinicsync clinicsync audit list --record Patient/5b0c…")]
    Audit {
        #[command(subcommand)]
        action: AuditCmd,
    },
    /// Configuration helpers.
    #[command(after_long_help = "Examples:
  clinicsync config check                       # every problem, with its key or line; exit 3 when there is one
  clinicsync -c /srv/new.toml config check")]
    Config {
        #[command(subcommand)]
        action: ConfigCmd,
    },
    /// At a hub: enrol, remove, list and re-key children without a restart.
    #[command(after_long_help = "Examples:
  sudo clinicsync child add clinic-a --catchment address.district=Kakamega --token-file /root/clinic-a.token
  sudo -u clinicsync clinicsync child list      # last contact of each clinic
  sudo clinicsync child rotate clinic-a --overlap 7d
  sudo clinicsync child remove clinic-a         # refused by the running hub at once")]
    Child {
        #[command(subcommand)]
        action: children::ChildCmd,
    },
    /// Credentials for children.
    #[command(after_long_help = "Examples:
  clinicsync token new      # the token goes to the clinic's token_file, the hash to the hub's [[hub.children]]
  (`clinicsync child add` does both at a running hub)")]
    Token {
        #[command(subcommand)]
        action: TokenCmd,
    },
    /// Copy the store to FILE while the node runs (SQLite online backup), verified
    /// (integrity, node id, audit chain) before it is kept; mode 0600.
    #[command(after_long_help = "Examples:
  sudo -u clinicsync clinicsync backup /var/lib/clinicsync/backup-$(date +%F).db")]
    Backup {
        /// Where the copy goes (a new file).
        file: PathBuf,
    },
    /// Put a backup in place of the store (the daemon must be stopped); the store it
    /// replaces is kept beside it as `<store>.before-restore`.
    #[command(after_long_help = "Examples:
  sudo systemctl stop clinicsync
  sudo -u clinicsync clinicsync restore /var/lib/clinicsync/backup-2026-11-20.db
  sudo systemctl start clinicsync")]
    Restore {
        /// A backup made by `clinicsync backup`.
        file: PathBuf,
    },
    /// At a hub: which patients each child holds, and moving them by hand
    /// (audited). Clinics write only for patients of their catchment.
    #[command(after_long_help = "Examples:
  sudo -u clinicsync clinicsync catchment list clinic-a
  sudo -u clinicsync clinicsync catchment add clinic-a Patient/5b0c…
  sudo -u clinicsync clinicsync catchment move Patient/5b0c… clinic-a clinic-b
  sudo -u clinicsync clinicsync catchment preview clinic-c --path address.district --equals Vihiga")]
    Catchment {
        #[command(subcommand)]
        action: CatchmentCmd,
    },
    /// This node's bundle keys, and the nodes it trusts.
    #[command(
        after_long_help = "Examples (once per pair of nodes, before the first USB bundle):
  sudo -u clinicsync clinicsync keys init
  sudo -u clinicsync clinicsync keys show > clinic-a.key      # carry it to the hub
  sudo -u clinicsync clinicsync keys trust hub.key --parent   # at the clinic
  sudo -u clinicsync clinicsync keys trust clinic-a.key       # at the hub"
    )]
    Keys {
        #[command(subcommand)]
        action: KeysCmd,
    },
    /// Write a USB bundle for the parent: everything not yet acknowledged plus the
    /// pull cursor, encrypted to the parent and signed by this node.
    #[command(after_long_help = "Examples:
  sudo -u clinicsync clinicsync export /media/usb
  sudo -u clinicsync clinicsync export /media/usb --part-size 4G   # a FAT32 stick holds files under 4 GiB")]
    Export {
        /// Directory to write into (the mounted stick).
        dir: PathBuf,
        /// Split into parts of at most this size (e.g. 512M, 4G; 0 = one file).
        #[arg(long, default_value = "0", value_parser = parse_size)]
        part_size: u64,
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Import a USB bundle (any of its parts): on a hub, apply a clinic's export and
    /// write the return bundle beside it; on a clinic, apply the return bundle.
    #[command(after_long_help = "Examples:
  sudo -u clinicsync clinicsync import /media/usb/clinic-a-to-hub-….csb     # at the hub: writes the return bundle beside it
  sudo -u clinicsync clinicsync import /media/usb/hub-to-clinic-a-….csb     # back at the clinic
A bundle already imported (or older than one that was) is refused by name; nothing is applied twice.")]
    Import {
        /// The bundle, or any of its parts (`….csb.001`, …).
        file: PathBuf,
        /// Part size for the return bundle a hub writes (e.g. 512M, 4G; 0 = one file).
        #[arg(long, default_value = "0", value_parser = parse_size)]
        part_size: u64,
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Start a hub and two clinics on 127.0.0.1, write synthetic data, sync, show status.
    #[command(after_long_help = "Examples:
  clinicsync demo                               # nothing is kept
  clinicsync demo --dir /tmp/demo --patients 200 # keeps the nodes' configs and stores to look at")]
    Demo {
        /// Keep the demo's nodes in this directory (new or empty; refused otherwise) instead of a temporary one removed at the end.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Patients registered at each clinic.
        #[arg(long, default_value_t = 20)]
        patients: usize,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeysCmd {
    /// Create this node's signing and encryption keys (never overwrites).
    Init,
    /// Print this node's public key line, for the other side's `keys trust`.
    Show,
    /// Trust another node's public key line (a file, or the line itself).
    Trust {
        /// The other node's `keys show` line, or a file holding it.
        key: String,
        /// This node is our parent (the recipient of our exports); refused on a root
        /// hub, which has no [parent].
        #[arg(long)]
        parent: bool,
        /// The node is already trusted with another key and its keys really changed:
        /// replace the old key (audited). Without it, a different key is refused.
        #[arg(long)]
        replace: bool,
    },
    /// Stop trusting a node's keys: its bundles are refused from then on (audited).
    Untrust {
        /// The node whose keys are no longer trusted.
        node: String,
    },
    /// List trusted nodes (a stored line that is not its node's key is marked DAMAGED).
    List {
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `512M`, `4G`, `65536`.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size such as 512M or 4G"))?;
    let size = n
        .checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    if size != 0 && size < 4096 {
        return Err(format!("{s:?} is too small for a part (at least 4K)"));
    }
    Ok(size)
}

#[derive(Subcommand, Debug)]
pub enum QuarantineCmd {
    /// List quarantined records with their stage and reason.
    ///
    /// Stages: push (refused by the parent), apply (not yet applied here or written
    /// into the EMR), pull (arrived from the parent unreadable; held as received,
    /// read again on each retry).
    List {
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show one quarantined record, its reason and its current content.
    ///
    /// A record held unreadable from a pull (stage pull) also shows "held": its
    /// text as it arrived.
    Show {
        /// The record, as `Kind/id`.
        record: String,
    },
    /// Make a record (or --all) due for retry at the next sync.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["record", "all"])))]
    Retry {
        /// The record, as `Kind/id`, as `quarantine list` shows it.
        record: Option<String>,
        /// Every quarantined record.
        #[arg(long)]
        all: bool,
    },
    /// Give up on a record: it leaves the quarantine and the queue (history keeps it).
    Drop {
        /// The record, as `Kind/id`.
        record: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConflictsCmd {
    /// Every conflict, open (resolved by policy, not yet reviewed) and resolved.
    List {
        /// Only the open ones.
        #[arg(long)]
        open: bool,
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Both versions of one conflict, by its number.
    Show {
        /// The conflict's number, as `conflicts list` shows it.
        n: i64,
    },
    /// Review conflict N: keep one side or new content. The result is a new version
    /// that supersedes both sides, syncs like any edit and is audited.
    #[command(
        after_help = "KEEP:\n  winner   what the policy kept (writes nothing new if the record is unchanged since)\n  other    the side the policy did not keep\n  local    this node's side as it was when the conflict was detected\n  remote   the other node's side\n  FILE     a JSON file with the corrected resource (same type and id)\n\nExamples:\n  clinicsync conflicts list --open\n  clinicsync conflicts show 3\n  clinicsync conflicts resolve 3 --keep other\n  clinicsync conflicts resolve 3 --keep corrected-patient.json"
    )]
    Resolve {
        /// The conflict's number, as `conflicts list` shows it.
        n: i64,
        /// winner | other | local | remote | FILE.json
        #[arg(long)]
        keep: String,
        /// Replace an edit made to the record after the conflict.
        #[arg(long)]
        force: bool,
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum CatchmentCmd {
    /// Patients held by each child (or one child), with why: rule, registered, granted.
    List {
        /// Only this child (a child of this hub).
        node: Option<String>,
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Give a child a patient (it then receives the whole record and may write for it).
    Add {
        /// The child (a child of this hub).
        node: String,
        /// The patient, as `Patient/<id>` or its id.
        patient: String,
    },
    /// Take a patient from a child (a matching rule gives it back on the patient's
    /// next version; records the clinic already holds stay there).
    Remove {
        /// The child (a child of this hub).
        node: String,
        /// The patient, as `Patient/<id>` or its id.
        patient: String,
    },
    /// What a rule gives a child before it is enabled: patients, records, bytes and
    /// the bootstrap time at the child's measured link rate. Without --path and
    /// --equals: the child's rules as configured.
    #[command(
        after_help = "Examples:\n  clinicsync catchment preview clinic-c --path address.district --equals Vihiga\n  clinicsync catchment preview clinic-a --rate-kbit 64 --json"
    )]
    Preview {
        /// The child (a child of this hub).
        node: String,
        /// The rule's path into a Patient (e.g. address.district).
        #[arg(long, requires = "equals")]
        path: Option<String>,
        /// The value at --path that puts a patient in the catchment.
        #[arg(long, requires = "path")]
        equals: Option<String>,
        /// Link rate for the estimate when the child has measured none.
        #[arg(long)]
        rate_kbit: Option<u64>,
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// A patient moves between clinics: the new one receives the whole record, the
    /// old one no more of it (what it has not pushed yet is still accepted). With
    /// --purge the old clinic is ordered to remove its copies, except unpushed ones.
    #[command(
        after_help = "Example:\n  clinicsync catchment move Patient/5b0c… clinic-a clinic-b --purge"
    )]
    Move {
        /// The patient, as `Patient/<id>` or its id.
        patient: String,
        /// The clinic whose catchment it leaves (a child of this hub).
        from: String,
        /// The clinic whose catchment it joins (a child of this hub).
        to: String,
        /// Order `from` to remove its copies of the patient's records (unpushed ones
        /// stay until pushed).
        #[arg(long)]
        purge: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum RemoteCmd {
    /// Retry (make due now) or drop a record in the child's quarantine.
    Quarantine {
        #[command(subcommand)]
        action: RemoteQuarantineCmd,
    },
    /// The child pulls everything again from the start (its own records included).
    Resync,
    /// The child sends up its status, quarantine and recent log lines.
    Diagnostics,
    /// Orders given to this child: pending, done, refused or failed, newest first.
    List {
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// One order with its full result (diagnostics arrive here).
    Show {
        /// The order's id, as `remote NODE list` shows it.
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum RemoteQuarantineCmd {
    /// Make a record (or --all) in the child's quarantine due for retry at its next
    /// sync. NODE is the child (`clinicsync remote --help`).
    #[command(
        override_usage = "clinicsync remote <NODE> quarantine retry [OPTIONS] <RECORD|--all>",
        group(clap::ArgGroup::new("which").required(true).args(["record", "all"]))
    )]
    Retry {
        /// The record, as `Kind/id` (e.g. Patient/9f2c…), as the child's
        /// `quarantine list` shows it.
        record: Option<String>,
        /// Every record in the child's quarantine.
        #[arg(long)]
        all: bool,
    },
    /// Give up on a record at the child: it leaves the child's quarantine and queue
    /// (its history keeps it). NODE is the child (`clinicsync remote --help`).
    #[command(override_usage = "clinicsync remote <NODE> quarantine drop [OPTIONS] <RECORD>")]
    Drop {
        /// The record, as `Kind/id`.
        record: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuditCmd {
    /// Recompute the hash chain; fails naming the first altered or missing row.
    Verify,
    /// The newest entries, newest first: when, who, what, which record.
    #[command(
        after_help = "Examples:\n  clinicsync audit list --limit 20\n  clinicsync audit list --record Patient/5b0c…\n  clinicsync audit list --action order --json"
    )]
    List {
        /// Only entries about this record (or node, for orders and catchment moves).
        #[arg(long)]
        record: Option<String>,
        /// Only this action (write, delete, conflict, quarantine, resolve, order, …).
        #[arg(long)]
        action: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Validate the configuration file and list every problem, each with its key or
    /// line; exit 3 when there is one.
    Check,
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Make a new child credential: the token for the child's token_file and the
    /// hash for the hub's [[hub.children]].
    New,
}

/// An error with the exit code it maps to.
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
}

impl Failure {
    /// An exit code whose reason the command has already printed.
    pub fn quiet(code: u8) -> Failure {
        Failure {
            code,
            message: String::new(),
        }
    }
}

/// The exit code of an error of `class` whose permanent form exits `specific`: the
/// one place the classes meet the exit codes (see [`EXIT_CODES`]).
pub fn exit_code_for(class: ErrorClass, specific: u8) -> u8 {
    match class {
        ErrorClass::Corruption => EXIT_CORRUPT,
        ErrorClass::Retryable => EXIT_LINK,
        ErrorClass::Permanent => specific,
    }
}

impl Failure {
    /// `e`, exiting by its class: [`exit_code_for`]`(e.class(), specific)`.
    pub fn classified(e: &(impl Classify + std::fmt::Display), specific: u8) -> Failure {
        Failure::new(exit_code_for(e.class(), specific), e.to_string())
    }
}

impl From<crate::store::StoreError> for Failure {
    fn from(e: crate::store::StoreError) -> Self {
        Failure::classified(&e, EXIT_STORE)
    }
}

impl From<engine::EngineError> for Failure {
    fn from(e: engine::EngineError) -> Self {
        match e {
            engine::EngineError::Store(s) => s.into(),
            engine::EngineError::NotFound(m) => Failure::new(EXIT_NOT_FOUND, m),
            other => Failure::classified(&other, EXIT_FAILURE),
        }
    }
}

impl From<crate::model::ModelError> for Failure {
    fn from(e: crate::model::ModelError) -> Self {
        Failure::classified(&e, EXIT_FAILURE)
    }
}

impl From<config::ConfigError> for Failure {
    fn from(e: config::ConfigError) -> Self {
        Failure::classified(&e, EXIT_CONFIG)
    }
}

impl From<client::SyncError> for Failure {
    fn from(e: client::SyncError) -> Self {
        match e {
            client::SyncError::Transport(t) => Failure::classified(&t, EXIT_LINK),
            client::SyncError::Engine(e) => e.into(),
        }
    }
}

/// The class of the first error in `e`'s chain that knows its class (the outermost:
/// a wrapping error answers for its sources). For errors that reach the edge as
/// `anyhow` (the daemon's `run`).
fn class_in_chain(e: &anyhow::Error) -> Option<ErrorClass> {
    fn class_of(e: &(dyn std::error::Error + 'static)) -> Option<ErrorClass> {
        macro_rules! try_types {
            ($($t:ty),+ $(,)?) => {
                $(if let Some(x) = e.downcast_ref::<$t>() {
                    return Some(x.class());
                })+
            };
        }
        try_types!(
            crate::store::StoreError,
            engine::EngineError,
            crate::emr::flow::EmrFlowError,
            crate::emr::EmrError,
            crate::transport::http::TransportError,
            crate::wire::WireError,
            crate::model::ModelError,
            config::ConfigError,
            crate::keys::KeyError,
            crate::transport::file::BundleError,
            crate::sneakernet::SneakerError,
            crate::lock::LockError,
            crate::tls::TlsError,
            client::SyncError,
            crate::hub::HubCorrupt,
        );
        None
    }
    e.chain().find_map(class_of)
}

type Out = Result<(), Failure>;

/// Is standard output a pipe (`clinicsync ls | head`)?
fn stdout_is_a_pipe() -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata("/proc/self/fd/1")
        .map(|m| m.file_type().is_fifo())
        .unwrap_or(false)
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run) && stdout_is_a_pipe() {
        // A listing piped into `head` or `grep -q` should end quietly, as Unix tools
        // do. Only then: elsewhere SIGPIPE stays ignored, so a socket or a pipe other
        // than our output that closes becomes an error with a message, never a
        // silent exit 141. The daemon always keeps it ignored.
        // SAFETY: restoring a signal's default disposition before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = dispatch(cli);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            // Messages can quote a peer, an EMR or a file: no escape sequences.
            if !f.message.is_empty() {
                eprintln!("clinicsync: {}", safe_lines(&f.message));
            }
            ExitCode::from(f.code)
        }
    }
}

fn dispatch(cli: Cli) -> Out {
    let path = cli.config.clone();
    match cli.command {
        Command::Demo { dir, patients } => demo::run(dir, patients),
        Command::Token {
            action: TokenCmd::New,
        } => {
            let token = crate::auth::new_token();
            println!("token:        {token}");
            println!("token_sha256: {}", crate::auth::token_hash(&token));
            println!("\nPut the token in the child's parent.token_file (mode 0600, owned by the service user); put the hash in the hub's [[hub.children]].");
            Ok(())
        }
        Command::Config {
            action: ConfigCmd::Check,
        } => config_check(&path),
        Command::Doctor { json } => doctor::run(&path, json),
        Command::Generate { what, dir } => generate(&what, &dir),
        Command::Run => {
            let cfg = Config::load(&path)?;
            daemon::init_logging("info");
            // Corruption stops the daemon with its own code (systemd does not restart
            // it: RestartPreventExitStatus); any other failure to run is 1.
            let store = cfg.node.store.clone();
            daemon::run(cfg).map_err(|e| {
                let code = match class_in_chain(&e) {
                    Some(ErrorClass::Corruption) => {
                        // Not restarted by systemd: `status` says why it stays down.
                        if let Err(io) = crate::lock::leave_stop_note(&store, &format!("{e:#}")) {
                            tracing::warn!(error = %io, "cannot leave the note of why the daemon stopped");
                        }
                        EXIT_CORRUPT
                    }
                    _ => EXIT_FAILURE,
                };
                Failure::new(code, format!("{e:#}"))
            })
        }
        other => {
            let cfg = Config::load(&path)?;
            if matches!(other, Command::Sync { .. }) {
                // A one-off sync tells the technician what went wrong on the way.
                daemon::init_logging("warn");
            }
            with_config(&cfg, other)
        }
    }
}

/// The man page and completions, generated from this very CLI definition.
fn generate(what: &str, dir: &Path) -> Out {
    use clap::CommandFactory;
    let io = |e: std::io::Error| Failure::new(EXIT_FAILURE, format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut cmd = Cli::command();
    match what {
        "man" => {
            cmd.build();
            for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
                let name = format!("clinicsync-{}", sub.get_name());
                let page = sub.clone().name(name.clone());
                let mut out = Vec::new();
                clap_mangen::Man::new(page).render(&mut out).map_err(io)?;
                std::fs::write(dir.join(format!("{name}.1")), out).map_err(io)?;
            }
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut out).map_err(io)?;
            std::fs::write(dir.join("clinicsync.1"), out).map_err(io)?;
        }
        // The README's exit code table (a test checks the README holds it).
        "exit-codes" => {
            std::fs::write(dir.join("exit-codes.md"), exit_codes_markdown()).map_err(io)?;
        }
        "completions" => {
            use clap_complete::Shell;
            for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
                clap_complete::generate_to(shell, &mut cmd, "clinicsync", dir).map_err(io)?;
            }
        }
        other => {
            return Err(Failure::new(
                EXIT_USAGE,
                format!("generate {other:?}: expected man, completions or exit-codes"),
            ))
        }
    }
    Ok(())
}

fn config_check(path: &Path) -> Out {
    let cfg = Config::load(path)?;
    if let Some(p) = &cfg.parent {
        // A missing credential is a deployment step still to do, not a bad file.
        match crate::auth::read_token(&p.token_file) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => eprintln!(
                "warning: parent.token_file {}: {e} (create it before starting the service)",
                safe_display(p.token_file.display())
            ),
            // Loose permissions are refused by every command that uses the file.
            Err(e)
                if e.kind() == std::io::ErrorKind::PermissionDenied
                    && crate::filemode::check_credential(&p.token_file).is_err()
                    && e.to_string().contains("chmod 600") =>
            {
                return Err(Failure::new(
                    EXIT_CONFIG,
                    format!("parent.token_file: {}", safe(&e.to_string())),
                ))
            }
            Err(e) => eprintln!("warning: parent.token_file: {}", safe(&e.to_string())),
            Ok(_) => {}
        }
    }
    if cfg.emr.kind != config::EmrKind::Embedded && !cfg.emr.credentials_file.as_os_str().is_empty()
    {
        // The same check `run` makes before it reads the file: a credential open to
        // other users is refused here, not only when the service starts.
        match crate::filemode::check_credential(&cfg.emr.credentials_file) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => eprintln!(
                "warning: emr.credentials_file {}: {e} (create it, user:password on one line, mode 0600, before starting the service)",
                safe_display(cfg.emr.credentials_file.display())
            ),
            Err(e) if e.to_string().contains("chmod 600") => {
                return Err(Failure::new(
                    EXIT_CONFIG,
                    format!("emr.credentials_file: {}", safe(&e.to_string())),
                ))
            }
            Err(e) => eprintln!("warning: emr.credentials_file: {}", safe(&e.to_string())),
            Ok(()) => {
                if let Err(e) = std::fs::read_to_string(&cfg.emr.credentials_file) {
                    eprintln!(
                        "warning: emr.credentials_file {}: {e} (the service user must be able to read it)",
                        safe_display(cfg.emr.credentials_file.display())
                    );
                }
            }
        }
    }
    if let Some(hub) = &cfg.hub {
        for r in &hub.catchment {
            if !hub.children.iter().any(|c| c.node == r.node) {
                eprintln!(
                    "warning: a hub.catchment rule names {:?}, which is not one of hub.children (the rule is inert)",
                    safe(&r.node)
                );
            }
        }
    }
    println!(
        "{}: ok (node {}, {}{})",
        safe_display(path.display()),
        safe(&cfg.node.id),
        cfg.role(),
        cfg.hub
            .as_ref()
            .map(|h| format!(
                ", {} children, {} catchment rules",
                h.children.len(),
                h.catchment.len()
            ))
            .unwrap_or_default()
    );
    Ok(())
}

/// Checks a store file as a restore would take it: intact, this node's, from a
/// schema this binary reads, audit chain whole. Returns its record count and audit head.
fn verify_store_file(cfg: &Config, file: &Path) -> Result<(u64, String), Failure> {
    let bad = |code: u8, why: String| {
        Failure::new(code, format!("{}: {why}", safe_display(file.display())))
    };
    let store_err =
        |e: crate::store::StoreError| bad(exit_code_for(e.class(), EXIT_STORE), e.to_string());
    let s = Store::open_existing(file).map_err(store_err)?;
    if s.node_id() != cfg.node.id {
        return Err(bad(
            EXIT_STORE,
            format!(
                "is the store of node {:?}, not of this node {:?}",
                safe(s.node_id()),
                safe(&cfg.node.id)
            ),
        ));
    }
    // A file SQLite finds damaged, or whose audit chain does not hold, is not what was
    // written: corruption, whichever store it is.
    let integrity = s.integrity_check().map_err(store_err)?;
    if integrity != "ok" {
        return Err(bad(
            EXIT_CORRUPT,
            format!("integrity check failed: {}", safe(&integrity)),
        ));
    }
    let head = match s.verify_audit().map_err(store_err)? {
        AuditCheck::Intact { head, .. } => head,
        other => return Err(bad(EXIT_CORRUPT, format!("audit chain broken: {other:?}"))),
    };
    Ok((s.counts().map_err(store_err)?.records, head))
}

fn backup(cfg: &Config, file: &Path) -> Out {
    let store = open_existing(cfg)?;
    let io = |e: std::io::Error| {
        Failure::new(
            EXIT_FAILURE,
            format!("{}: {e}", safe_display(file.display())),
        )
    };
    if file.exists() {
        return Err(Failure::new(
            EXIT_FAILURE,
            format!(
                "{} exists; give a new file name (a backup never overwrites)",
                safe_display(file.display())
            ),
        ));
    }
    let tmp = file.with_extension("partial");
    let _ = std::fs::remove_file(&tmp);
    crate::filemode::write_private(&tmp, b"").map_err(io)?;
    let copied = (|| -> rusqlite::Result<()> {
        let mut dst = rusqlite::Connection::open(&tmp)?;
        let b = rusqlite::backup::Backup::new(store.conn(), &mut dst)?;
        // Small steps with pauses: the daemon keeps writing meanwhile.
        b.run_to_completion(512, std::time::Duration::from_millis(2), None)?;
        Ok(())
    })();
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&tmp);
        let e = crate::store::StoreError::from(e);
        return Err(Failure::new(
            exit_code_for(e.class(), EXIT_STORE),
            format!("backup failed: {e}"),
        ));
    }
    let verified = verify_store_file(cfg, &tmp);
    let (records, head) = match verified {
        Ok(v) => v,
        Err(f) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(f);
        }
    };
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, file).map_err(io)?;
    println!(
        "backup of {} written to {}: {records} records, audit head {head}, verified",
        safe(&cfg.node.id),
        safe_display(file.display())
    );
    Ok(())
}

fn restore(cfg: &Config, file: &Path) -> Out {
    refuse_root_on_service_store(&cfg.node.store)?;
    if crate::lock::daemon_running(&cfg.node.store) {
        return Err(Failure::new(
            EXIT_STORE,
            "the daemon is running on this store: stop it first (systemctl stop clinicsync), then restore",
        ));
    }
    let (records, head) = verify_store_file(cfg, file)?;
    let store = &cfg.node.store;
    let io = |e: std::io::Error| Failure::new(EXIT_FAILURE, format!("restore failed: {e}"));
    let incoming = store.with_extension("restoring");
    let _ = std::fs::remove_file(&incoming);
    std::fs::copy(file, &incoming).map_err(io)?;
    std::fs::set_permissions(
        &incoming,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .map_err(io)?;
    std::fs::File::open(&incoming)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    let with_suffix = |p: &Path, suffix: &str| {
        let mut s = p.as_os_str().to_owned();
        s.push(suffix);
        std::path::PathBuf::from(s)
    };
    if store.exists() {
        // Fold the old store's WAL into it before keeping it aside: a WAL left next
        // to the restored file would be replayed into it. A store too damaged to
        // open (exactly when a restore is wanted) is kept aside as it is, its WAL and
        // shared memory with it, so nothing of it is lost or replayed.
        let folded = Store::open_existing(store).and_then(|s| {
            s.conn()
                .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
                .map_err(Into::into)
        });
        let damaged = match folded {
            Ok(()) => false,
            Err(e) if e.is_corruption() => {
                eprintln!("the current store is damaged ({e}); keeping it aside as it is");
                true
            }
            Err(e) => {
                let _ = std::fs::remove_file(&incoming);
                return Err(Failure::new(
                    exit_code_for(e.class(), EXIT_STORE),
                    format!("the current store: {e}"),
                ));
            }
        };
        // `<store>.before-restore`, or `.before-restore.2`, … : an earlier restore's
        // safety copy is never overwritten.
        let mut aside = std::path::PathBuf::from(format!("{}.before-restore", store.display()));
        let mut n = 1;
        while aside.exists() {
            n += 1;
            aside = std::path::PathBuf::from(format!("{}.before-restore.{n}", store.display()));
        }
        std::fs::rename(store, &aside).map_err(io)?;
        if damaged {
            for suffix in ["-wal", "-shm"] {
                let from = with_suffix(store, suffix);
                if from.exists() {
                    std::fs::rename(&from, with_suffix(&aside, suffix)).map_err(io)?;
                }
            }
        }
        println!(
            "the store it replaces is kept as {}",
            safe_display(aside.display())
        );
    }
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(with_suffix(store, suffix));
    }
    std::fs::rename(&incoming, store).map_err(io)?;
    println!(
        "restored {} from {}: {records} records, audit head {head}; start the daemon (systemctl start clinicsync)",
        safe(&cfg.node.id),
        safe_display(file.display())
    );
    Ok(())
}

fn catchment(cfg: &Config, action: CatchmentCmd, now: u64) -> Result<(), Failure> {
    let hub = cfg.hub.as_ref().ok_or_else(|| {
        Failure::new(
            EXIT_CONFIG,
            "this node serves no children ([hub]): catchments are kept at the hub",
        )
    })?;
    let child = |node: &str| -> Result<(), Failure> {
        if hub.children.iter().any(|c| c.node == node) {
            Ok(())
        } else {
            Err(Failure::new(
                EXIT_NOT_FOUND,
                format!("{node:?} is not one of this hub's children (hub.children)"),
            ))
        }
    };
    let patient_id = |p: &str| -> Result<String, Failure> {
        let id = p.strip_prefix("Patient/").unwrap_or(p);
        Ok(RecordKey::new("Patient", id)?.id)
    };
    match action {
        CatchmentCmd::Preview {
            node,
            path,
            equals,
            rate_kbit,
            json,
        } => {
            let proposed = match (path, equals) {
                (Some(path), Some(equals)) => {
                    let rule = engine::CatchmentRule {
                        node: node.clone(),
                        path,
                        equals,
                    };
                    if rule.path.is_empty() || rule.path.split('.').any(|s| s.is_empty()) {
                        return Err(Failure::new(
                            2,
                            format!(
                                "--path {:?} must be a dotted field path such as address.district",
                                rule.path
                            ),
                        ));
                    }
                    Some(rule)
                }
                _ => None,
            };
            return catchment::preview(cfg, &node, proposed, rate_kbit, json);
        }
        CatchmentCmd::Move {
            patient,
            from,
            to,
            purge,
        } => return catchment::move_patient(cfg, &patient, &from, &to, purge, now),
        _ => {}
    }
    let mut store = open_existing(cfg)?;
    match action {
        CatchmentCmd::Preview { .. } | CatchmentCmd::Move { .. } => {}
        CatchmentCmd::List { node, json } => {
            let rows = store.catchment_list(node.as_deref())?;
            if json {
                print_json(
                    &rows
                        .iter()
                        .map(|(n, p, r)| json!({"node": n, "patient": p, "reason": r}))
                        .collect::<Vec<_>>(),
                );
            } else {
                for (n, p, r) in &rows {
                    println!("{:<24} Patient/{:<40} {}", safe(n), safe(p), r);
                }
                eprintln!("{} patient(s)", rows.len());
            }
        }
        CatchmentCmd::Add { node, patient } => {
            child(&node)?;
            let p = patient_id(&patient)?;
            let mut tx = store.begin()?;
            let added = tx.add_to_catchment(&node, &p, CatchmentReason::Granted)?;
            if added {
                tx.audit(
                    now,
                    "cli",
                    "catchment-add",
                    &format!("Patient/{p}"),
                    "",
                    &node,
                )?;
            }
            tx.commit()?;
            println!(
                "Patient/{p} {} the catchment of {node}",
                if added { "added to" } else { "was already in" }
            );
        }
        CatchmentCmd::Remove { node, patient } => {
            child(&node)?;
            let p = patient_id(&patient)?;
            let mut tx = store.begin()?;
            let removed = tx.remove_from_catchment(&node, &p)?;
            if removed {
                tx.audit(
                    now,
                    "cli",
                    "catchment-remove",
                    &format!("Patient/{p}"),
                    "",
                    &node,
                )?;
            }
            tx.commit()?;
            if !removed {
                return Err(Failure::new(
                    EXIT_NOT_FOUND,
                    format!("Patient/{p} is not in the catchment of {node}"),
                ));
            }
            println!("Patient/{p} removed from the catchment of {node}");
        }
    }
    Ok(())
}

/// The store, for commands that only read it (or act on what is already there):
/// never creates one, so a typo in `node.store` is named instead of showing an empty
/// node.
fn open_existing(cfg: &Config) -> Result<Store, Failure> {
    if !cfg.node.store.exists() {
        return Err(Failure::new(
            EXIT_STORE,
            format!(
                "no store at {}: check node.store in the configuration (the service creates the store on its first start: systemctl start clinicsync)",
                safe_display(cfg.node.store.display())
            ),
        ));
    }
    open(cfg)
}

/// The store, for commands that write (`sync`, `put`, `keys trust`, `export`, …):
/// created when missing, as a new or wiped node's first `sync --bootstrap` or the
/// service's first start does. Said out loud, so a mistyped node.store is noticed
/// before records are written into (or pulled into) a file nothing syncs.
fn open(cfg: &Config) -> Result<Store, Failure> {
    refuse_root_on_service_store(&cfg.node.store)?;
    let created = !cfg.node.store.exists();
    let store = cfg.open_store()?;
    if created {
        eprintln!(
            "clinicsync: no store was at {} (node.store): created a new one, as for a new or wiped node. If node.store is mistyped, stop, remove that file and correct the configuration.",
            safe_display(cfg.node.store.display())
        );
    }
    Ok(store)
}

/// Run as root on a node whose store (or its directory) belongs to the service user,
/// a command would leave root-owned files (the store, its `-wal`/`-shm`) that the
/// service can no longer write: refused, naming the command to use instead.
pub(crate) fn refuse_root_on_service_store(store: &Path) -> Result<(), Failure> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let probe = if store.exists() {
        store.to_path_buf()
    } else {
        match store.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => return Ok(()),
        }
    };
    let Ok(meta) = std::fs::metadata(&probe) else {
        return Ok(());
    };
    if meta.uid() == 0 {
        return Ok(());
    }
    let user = user_name(meta.uid()).unwrap_or_else(|| meta.uid().to_string());
    let args: Vec<String> = std::env::args().skip(1).collect();
    Err(Failure::new(
        EXIT_STORE,
        format!(
            "{} belongs to user {user}, and this command runs as root: files it created would lock the service out. Run it as that user: sudo -u {user} clinicsync {}",
            safe_display(probe.display()),
            safe(&args.join(" "))
        ),
    ))
}

/// The login name of `uid`, from the system's user database.
fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwuid_r writes into `pwd` and `buf`, both owned here and sized as
    // passed; `out` is checked before use and `pw_name` points into `buf`.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() {
        return None;
    }
    // SAFETY: on success pw_name is a NUL-terminated string inside `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

/// A record named on the command line: one that is not `<Kind>/<id>` is a usage error.
fn key(s: &str) -> Result<RecordKey, Failure> {
    RecordKey::parse(s).map_err(|e| Failure::new(EXIT_USAGE, e.to_string()))
}

fn client(cfg: &Config) -> Result<HttpClient, Failure> {
    let p = cfg
        .parent
        .as_ref()
        .ok_or_else(|| Failure::new(EXIT_CONFIG, "this node has no [parent] to sync with"))?;
    p.http_client(cfg.timeout())
        .map_err(|e| Failure::new(EXIT_CONFIG, e))
}

/// Prints JSON with C1 controls (U+0080–U+009F: U+009B starts a terminal escape
/// sequence on some terminals), bidirectional-override and other invisible format
/// characters as `\uXXXX` escapes: still the same JSON value, but one that cannot
/// drive or reorder what a technician's terminal shows. (JSON itself already escapes
/// C0 control characters.)
pub(crate) fn print_json(v: &impl serde::Serialize) {
    println!("{}", json_text(v));
}

/// The text [`print_json`] prints.
fn json_text(v: &impl serde::Serialize) -> String {
    let text = serde_json::to_string_pretty(v).unwrap_or_default();
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        // Only inside strings can such characters occur in serialized JSON.
        if matches!(c, '\u{80}'..='\u{9f}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
        {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

fn with_config(cfg: &Config, cmd: Command) -> Out {
    let now = wall_ms();
    match cmd {
        Command::Status { json } => status(cfg, json),
        Command::Fleet { json, silent_after } => fleet::run(cfg, json, silent_after, now),
        Command::Remote { node, action } => remote(cfg, &node, action, now),
        Command::Sync { json, bootstrap } => {
            let mut store = open(cfg)?;
            let link = client::connect_parent(cfg).map_err(|e| {
                // A credential file missing, unreadable or open to others is this
                // node's configuration, not the link (exit 3, as `config check`).
                let local = ["parent.token_file", "mqtt.password_file", "parent.ca_file"]
                    .iter()
                    .any(|k| e.starts_with(k));
                Failure::new(if local { EXIT_CONFIG } else { EXIT_LINK }, e)
            })?;
            let client = link.exchange.as_ref();
            if bootstrap {
                let (start, _) = store.cursor(PARENT)?;
                let bar = progress_bar(0, "changes");
                let shown = |cursor: u64, head: u64| {
                    bar.set_length(head.saturating_sub(start.eff).max(1));
                    bar.set_position(cursor.saturating_sub(start.eff).min(head));
                };
                let r = client::sync_with_progress(
                    &mut store,
                    &cfg.policy(),
                    client,
                    &cfg.sync,
                    &AtomicBool::new(false),
                    &shown,
                );
                bar.finish_and_clear();
                warn_skew(client.clock_skew_ms());
                let r = r?;
                println!(
                    "bootstrap: {} records pulled ({} bytes received), {} pushed, in {} ms{}",
                    r.pulled,
                    r.bytes_received,
                    r.pushed.sent,
                    r.elapsed_ms,
                    if r.resumed > 0 {
                        format!("; resumed after {} cuts", r.resumed)
                    } else {
                        String::new()
                    }
                );
                return Ok(());
            }
            let mut emr = cfg.emr_adapter()?;
            if let Some(e) = emr.as_mut() {
                crate::emr::flow::prepare_emr(&store, e.as_mut())?;
            }
            let result = client::round(
                &mut store,
                &cfg.policy(),
                client,
                &cfg.sync,
                emr.as_deref_mut(),
                &AtomicBool::new(false),
            );
            warn_skew(client.clock_skew_ms());
            let (report, emr_report) = result?;
            if let Some(e) = &emr_report.error {
                eprintln!("warning: {}", safe(e));
            }
            if json {
                print_json(&report);
            } else {
                let p = &report.pushed;
                println!(
                    "pushed {} records ({} accepted, {} duplicate, {} stale, {} conflict, {} rejected); pulled {} ({} applied, {} conflict); {} bytes sent, {} received in {} ms",
                    p.sent, p.accepted, p.duplicate, p.stale, p.conflict, p.rejected, report.pulled, report.applied.applied,
                    report.applied.conflict, report.bytes_sent, report.bytes_received, report.elapsed_ms
                );
            }
            Ok(())
        }
        Command::Put { files } => {
            if files.is_empty() {
                return Err(Failure::new(EXIT_USAGE, "put needs at least one JSON file"));
            }
            let mut items = Vec::new();
            for f in &files {
                let bytes = std::fs::read(f)
                    .map_err(|e| Failure::new(EXIT_FAILURE, format!("{}: {e}", f.display())))?;
                items
                    .extend(resources_of(&bytes).map_err(|e| {
                        Failure::new(EXIT_FAILURE, format!("{}: {e}", f.display()))
                    })?);
            }
            let mut store = open(cfg)?;
            let written = engine::write_local(&mut store, &cfg.policy(), items, now)?;
            let changed = written.iter().filter(|w| w.changed).count();
            println!("{changed} written, {} unchanged", written.len() - changed);
            Ok(())
        }
        Command::Get { record } => {
            let store = open_existing(cfg)?;
            let k = key(&record)?;
            let s = store.current(&k)?.ok_or_else(|| {
                Failure::new(EXIT_NOT_FOUND, format!("{k} is not held by this node"))
            })?;
            let mut body = s.version.snapshot.json();
            if s.version.deleted {
                eprintln!("({k} is deleted; last content follows)");
            }
            if let Some(obj) = body.as_object_mut() {
                obj.insert("meta".into(), json!({"versionId": s.seq.to_string()}));
            }
            print_json(&body);
            Ok(())
        }
        Command::Ls { kind, json } => {
            let store = open_existing(cfg)?;
            let rows = store.list(kind.as_deref())?;
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|s| json!({"record": s.version.key().to_string(), "seq": s.seq, "origin": s.version.origin,
                                    "vv": s.version.vv.0, "deleted": s.version.deleted, "patient": s.version.snapshot.patient}))
                    .collect();
                print_json(&v);
            } else {
                for s in &rows {
                    println!(
                        "{:<50} seq {:<8} origin {:<12} {}{}",
                        safe_display(s.version.key()),
                        s.seq,
                        safe(&s.version.origin),
                        safe_display(&s.version.vv),
                        if s.version.deleted { " (deleted)" } else { "" }
                    );
                }
                eprintln!("{} records", rows.len());
            }
            Ok(())
        }
        Command::Delete { record } => {
            let k = key(&record)?;
            let mut store = open(cfg)?;
            let cur = store.current(&k)?.ok_or_else(|| {
                Failure::new(EXIT_NOT_FOUND, format!("{k} is not held by this node"))
            })?;
            engine::write_local(
                &mut store,
                &cfg.policy(),
                vec![(cur.version.snapshot, true)],
                now,
            )?;
            println!("{k} deleted");
            Ok(())
        }
        Command::Fetch { records } => {
            let keys = records
                .iter()
                .map(|r| key(r).map(|k| (k.kind, k.id)))
                .collect::<Result<Vec<_>, _>>()?;
            let client = client(cfg)?;
            let req = Message::FetchRequest(crate::wire::FetchRequest {
                node: cfg.node.id.clone(),
                keys,
            });
            let (answer, _) = client
                .exchange("/v1/fetch", &req)
                .map_err(|e| Failure::classified(&e, EXIT_LINK))?;
            let Message::FetchResponse(resp) = answer else {
                return Err(Failure::new(
                    EXIT_LINK,
                    "parent answered something other than a fetch response",
                ));
            };
            let mut store = open(cfg)?;
            let n = engine::store_fetched(&mut store, PARENT, &resp, now)?;
            engine::apply_inbox(&mut store, &cfg.policy(), now)?;
            for r in &resp.results {
                if let Some(why) = &r.refused {
                    println!("{}/{}: refused: {}", safe(&r.kind), safe(&r.id), safe(why));
                }
            }
            println!("{n} records fetched");
            Ok(())
        }
        Command::Quarantine { action } => quarantine(cfg, action, now),
        Command::Child { action } => children::run(&cfg.path, cfg, action),
        Command::Catchment { action } => catchment(cfg, action, now),
        Command::Backup { file } => backup(cfg, &file),
        Command::Restore { file } => restore(cfg, &file),
        Command::Conflicts { action } => {
            let mut store = open_existing(cfg)?;
            match action {
                ConflictsCmd::List { open, json } => {
                    let mut list = store.conflicts_list(false, None)?;
                    if open {
                        list.retain(|c| c.reviewed_ms.is_none());
                    }
                    if json {
                        print_json(&list);
                    } else {
                        for c in &list {
                            if !c.lost_at.is_empty() {
                                println!(
                                    "#{:<5} {:<45} {}  this node's version {} lost at {}\n       {}",
                                    c.n,
                                    safe(&c.record),
                                    fmt_time(c.detected_ms),
                                    safe_display(&c.local_vv),
                                    safe(&c.lost_at),
                                    safe(&c.resolution)
                                );
                                continue;
                            }
                            println!(
                                "#{:<5} {:<45} {}  {} {} vs {} {}\n       {}",
                                c.n,
                                safe(&c.record),
                                fmt_time(c.detected_ms),
                                safe(&c.local_origin),
                                safe_display(&c.local_vv),
                                safe(&c.remote_origin),
                                safe_display(&c.remote_vv),
                                safe(&c.resolution)
                            );
                            match (c.reviewed_ms, &c.review) {
                                (Some(at), review) => println!(
                                    "       resolved {}: {}",
                                    fmt_time(at),
                                    safe(review.as_deref().unwrap_or_default())
                                ),
                                (None, _) => println!(
                                    "       open: review with `conflicts show {n}`, then `conflicts resolve {n} --keep …`",
                                    n = c.n
                                ),
                            }
                        }
                        let open = list.iter().filter(|c| c.reviewed_ms.is_none()).count();
                        eprintln!("{} conflicts, {open} open", list.len());
                    }
                }
                ConflictsCmd::Resolve {
                    n,
                    keep,
                    force,
                    json,
                } => {
                    let keep = match keep.as_str() {
                        "winner" => engine::Keep::Winner,
                        "other" => engine::Keep::Other,
                        "local" => engine::Keep::Local,
                        "remote" => engine::Keep::Remote,
                        file => {
                            let bytes = std::fs::read(file).map_err(|e| {
                                Failure::new(
                                    2,
                                    format!("--keep {file:?}: not winner, other, local or remote, and not a readable file: {e}"),
                                )
                            })?;
                            let snapshot = Snapshot::from_json_bytes(&bytes)
                                .map_err(|e| Failure::new(EXIT_FAILURE, format!("{file}: {e}")))?;
                            engine::Keep::Content(snapshot)
                        }
                    };
                    let r = engine::review_conflict(
                        &mut store,
                        &cfg.policy(),
                        n,
                        keep,
                        force,
                        "local",
                        now,
                    )?;
                    if json {
                        print_json(&r);
                    } else {
                        println!(
                            "conflict #{} on {}: {}{}",
                            r.conflict,
                            safe(&r.record),
                            safe(&r.kept),
                            match &r.new_vv {
                                Some(vv) => format!(
                                    "; new version {}, sent with the next sync",
                                    safe(&vv.to_string())
                                ),
                                None => "; nothing new to send".into(),
                            }
                        );
                    }
                }
                ConflictsCmd::Show { n } => {
                    let list = store.conflicts_list(true, Some(n))?;
                    let c = list
                        .first()
                        .ok_or_else(|| Failure::new(EXIT_NOT_FOUND, format!("no conflict #{n}")))?;
                    print_json(c);
                }
            }
            Ok(())
        }
        Command::History { record, json } => {
            let k = key(&record)?;
            let store = open_existing(cfg)?;
            let h = store.history(&k)?;
            if h.is_empty() {
                return Err(Failure::new(
                    EXIT_NOT_FOUND,
                    format!("{k} has never been seen by this node"),
                ));
            }
            if json {
                print_json(&h);
            } else {
                for e in &h {
                    println!(
                        "{}  {:<10} from {:<12} via {:<18} vv {:<24} {}{}",
                        fmt_time(e.seen_ms),
                        e.outcome,
                        safe(&e.origin),
                        safe(&e.source),
                        safe_display(&e.vv),
                        if e.changed.is_empty() {
                            "no change".to_string()
                        } else {
                            format!("changed: {}", safe(&e.changed.join(", ")))
                        },
                        if e.deleted { " (deleted)" } else { "" }
                    );
                }
            }
            Ok(())
        }
        Command::Audit {
            action: AuditCmd::Verify,
        } => {
            let store = open_existing(cfg)?;
            match store.verify_audit()? {
                AuditCheck::Intact { entries, head } => {
                    println!(
                        "audit chain intact: {entries} entries, head {}",
                        safe(&head)
                    );
                    Ok(())
                }
                AuditCheck::Broken { row, problem } => Err(Failure::new(
                    EXIT_AUDIT,
                    format!("audit chain broken at row {row}: {problem}"),
                )),
            }
        }
        Command::Audit {
            action:
                AuditCmd::List {
                    record,
                    action,
                    limit,
                    json,
                },
        } => {
            let store = open_existing(cfg)?;
            let rows = store.audit_list(record.as_deref(), action.as_deref(), limit)?;
            if json {
                print_json(&rows);
            } else {
                for r in &rows {
                    println!(
                        "#{:<7} {}  {:<14} {:<14} {:<40} {}",
                        r.n,
                        fmt_time(r.at_ms),
                        safe(&r.actor),
                        safe(&r.action),
                        safe(&r.record),
                        safe(&r.detail)
                    );
                }
                eprintln!("{} entries", rows.len());
            }
            Ok(())
        }
        Command::Keys { action } => keys(cfg, action),
        Command::Export {
            dir,
            part_size,
            json,
        } => {
            let me = identity(cfg)?;
            let mut store = open(cfg)?;
            let total = store.counts()?.outbox;
            let bar = progress_bar(total, "records");
            let r = crate::sneakernet::export(&mut store, &me, &dir, part_size, &|n| {
                bar.set_position(n)
            });
            bar.finish_and_clear();
            let r = r.map_err(sneaker_failure)?;
            if json {
                print_json(&r);
            } else {
                println!("bundle #{} with {} records written:", r.seq, r.records);
                for p in &r.parts {
                    println!("  {}", safe_display(p.display()));
                }
            }
            Ok(())
        }
        Command::Import {
            file,
            part_size,
            json,
        } => {
            let me = identity(cfg)?;
            let mut store = open(cfg)?;
            let bar = progress_bar(0, "records");
            let r =
                crate::sneakernet::import(&mut store, &cfg.policy(), &me, &file, part_size, &|n| {
                    bar.set_position(n)
                });
            bar.finish_and_clear();
            let r = r.map_err(sneaker_failure)?;
            if json {
                print_json(&r);
            } else {
                if r.resumed_after_items > 0 {
                    println!(
                        "resumed an interrupted import after {} items",
                        r.resumed_after_items
                    );
                }
                println!(
                    "{} bundle from {} imported: {} records applied ({} refused), {} receipts, {} records pulled",
                    safe(&r.kind), safe(&r.sender), r.records_applied, r.records_refused, r.receipts, r.pulled
                );
                for p in &r.return_parts {
                    println!("return bundle: {}", safe_display(p.display()));
                }
            }
            Ok(())
        }
        Command::Run
        | Command::Demo { .. }
        | Command::Token { .. }
        | Command::Doctor { .. }
        | Command::Generate { .. }
        | Command::Config { .. } => {
            unreachable!("dispatched before the configuration is loaded")
        }
    }
}

/// After a sync: says so when this node's clock is off from its parent's by more
/// than [`crate::transport::http::CLOCK_SKEW_REPORTED_MS`].
fn warn_skew(skew_ms: Option<i64>) {
    use crate::transport::http::{skew_words, CLOCK_SKEW_REPORTED_MS};
    let Some(skew) = skew_ms.filter(|s| s.unsigned_abs() > CLOCK_SKEW_REPORTED_MS) else {
        return;
    };
    let consequence = if skew > 0 && skew.unsigned_abs() > 300_000 {
        ": the parent refuses what this node writes while its clock is that far ahead (the records wait in quarantine and go once the clock is right)"
    } else {
        ""
    };
    eprintln!(
        "warning: {}{consequence}; set the clock (enable NTP, or `date -s`)",
        skew_words(skew)
    );
}

/// This node's bundle keys.
fn identity(cfg: &Config) -> Result<crate::keys::Identity, Failure> {
    crate::keys::Identity::load(&cfg.keys_dir(), &cfg.node.id)
        .map_err(|e| Failure::classified(&e, EXIT_CONFIG))
}

fn sneaker_failure(e: crate::sneakernet::SneakerError) -> Failure {
    use crate::sneakernet::SneakerError;
    match e {
        SneakerError::Engine(e) => e.into(),
        SneakerError::Keys(k) => Failure::classified(&k, EXIT_CONFIG),
        other => Failure::classified(&other, EXIT_BUNDLE),
    }
}

/// A progress bar on a terminal; hidden under systemd or in pipes.
fn progress_bar(total: u64, unit: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = if total > 0 {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::new_spinner()
    };
    let template = if total > 0 {
        format!("{{bar:40}} {{pos}}/{{len}} {unit} ({{eta}} left)")
    } else {
        format!("{{spinner}} {{pos}} {unit}")
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}

fn keys(cfg: &Config, action: KeysCmd) -> Out {
    use crate::keys::Identity;
    let dir = cfg.keys_dir();
    let key_failure = |e: crate::keys::KeyError| Failure::classified(&e, EXIT_CONFIG);
    match action {
        KeysCmd::Init => {
            // Keys root made here would be unreadable to the service: refused like
            // every other command that writes beside a service-owned store.
            refuse_root_on_service_store(&cfg.node.store)?;
            let id = Identity::init(&dir, &cfg.node.id).map_err(key_failure)?;
            println!("keys written to {}", dir.display());
            println!("{}", id.public().line());
        }
        KeysCmd::Show => println!(
            "{}",
            Identity::load(&dir, &cfg.node.id)
                .map_err(key_failure)?
                .public()
                .line()
        ),
        KeysCmd::Trust {
            key,
            parent,
            replace,
        } => trust(cfg, &key, parent, replace)?,
        KeysCmd::Untrust { node } => {
            let mut store = open(cfg)?;
            let now = wall_ms();
            let mut tx = store.begin()?;
            let Some((line, was_parent)) = tx.trusted(&node)? else {
                return Err(Failure::new(
                    EXIT_NOT_FOUND,
                    format!("{} is not trusted by this node", safe(&node)),
                ));
            };
            tx.untrust(&node)?;
            tx.audit(
                now,
                "technician",
                "untrust",
                &node,
                "",
                &format!(
                    "{}; key {}",
                    if was_parent { "parent" } else { "peer" },
                    fingerprint(&line)
                ),
            )?;
            tx.commit()?;
            println!(
                "no longer trusting {}{}",
                safe(&node),
                if was_parent {
                    " (it was this node's parent: exports are refused until a parent key is trusted)"
                } else {
                    ""
                }
            );
        }
        KeysCmd::List { json } => {
            // Every row is shown; one that does not hold its node's key is flagged
            // under it (bundles from that node are refused as corruption) and the
            // command ends with the corruption exit once all are listed.
            let store = open_existing(cfg)?;
            let mut damaged = None;
            let mut rows = Vec::new();
            for (node, line, is_parent) in store.trusted_list()? {
                let problem = crate::sneakernet::trusted_keys(&store, &node).err();
                if !json {
                    println!(
                        "{}{}\n  {}",
                        safe(&node),
                        if is_parent { " (parent)" } else { "" },
                        safe(&line)
                    );
                    if let Some(e) = &problem {
                        println!("  DAMAGED: {}", safe(&e.to_string()));
                    }
                }
                rows.push(serde_json::json!({
                    "node": node,
                    "parent": is_parent,
                    "line": line,
                    "damaged": problem.as_ref().map(|e| e.to_string()),
                }));
                if let Some(e) = problem {
                    damaged.get_or_insert(e);
                }
            }
            if json {
                print_json(&rows);
            } else if rows.is_empty() {
                eprintln!("no keys trusted yet: `clinicsync keys trust <key line or file>` (see `keys show` on the other node)");
            }
            if let Some(e) = damaged {
                return Err(Failure::classified(&e, EXIT_BUNDLE));
            }
        }
    }
    Ok(())
}

/// Whether a stored trusted-key line is `node`'s public key line.
fn key_line_of(line: &str, node: &str) -> bool {
    crate::keys::PublicKeys::parse(line).is_ok_and(|k| k.node == node)
}

/// The first 16 hex digits of the signing key in a public key line, to tell keys
/// apart in messages and the audit log ("damaged" for a line that is not a key).
fn fingerprint(line: &str) -> String {
    if crate::keys::PublicKeys::parse(line).is_err() {
        return "damaged".into();
    }
    line.split_whitespace()
        .nth(3)
        .map(|k| k.chars().take(16).collect())
        .unwrap_or_else(|| "?".into())
}

/// `keys trust`: a new node is trusted; the same key again changes at most its role;
/// a different key for a node already trusted needs `--replace`. Every change is
/// audited in the same transaction that makes it.
fn trust(cfg: &Config, key: &str, parent: bool, replace: bool) -> Out {
    use crate::keys::PublicKeys;
    if parent && cfg.parent.is_none() {
        return Err(Failure::new(
            EXIT_FAILURE,
            format!(
                "this node ({}) is a root hub: its configuration has no [parent], so there is no parent key to trust; \
                 trust a child's key without --parent",
                safe(&cfg.node.id)
            ),
        ));
    }
    // A file holding the line, or the line itself; a path that names no file is
    // said to be one (not blamed as a malformed key).
    let line = match std::fs::read_to_string(key) {
        Ok(text) => text,
        Err(e) if !key.trim_start().starts_with("clinicsync-node ") => {
            return Err(Failure::new(
                EXIT_FAILURE,
                format!(
                    "{}: {e} (give the file `keys show` wrote, or its line itself)",
                    safe(key)
                ),
            ))
        }
        Err(_) => key.to_string(),
    };
    let public =
        PublicKeys::parse(line.trim()).map_err(|e| Failure::new(EXIT_CONFIG, e.to_string()))?;
    if public.node == cfg.node.id {
        return Err(Failure::new(EXIT_FAILURE, "that is this node's own key"));
    }
    let (node, new_line) = (public.node.clone(), public.line());
    let role = if parent { "parent" } else { "peer" };
    let mut store = open(cfg)?;
    let old_parent = store.trusted_parent()?.map(|(n, _)| n);
    let now = wall_ms();
    let mut tx = store.begin()?;
    let mut replaced = None;
    let mut detail = role.to_string();
    match tx.trusted(&node)? {
        Some((old, was_parent)) if old == new_line && was_parent == parent => {
            println!("already trusting {node} with this key");
            return Ok(());
        }
        // The same key in another role (parent or not): audited as a trust.
        Some((old, _)) if old == new_line => {}
        Some((old, _)) if !replace && !key_line_of(&old, &node) => {
            return Err(Failure::new(
                EXIT_CORRUPT,
                format!(
                    "the stored key line of {node} is damaged (`clinicsync keys list` marks it DAMAGED); nothing was changed. \
                     If this key is {node}'s (confirm it with the technician there), `clinicsync keys trust <key> --replace` stores it"
                ),
            ))
        }
        Some((old, _)) if !replace => {
            return Err(Failure::new(
                EXIT_FAILURE,
                format!(
                    "{node} is already trusted with another key ({}); this key ({}) was not trusted. \
                     If {node}'s keys really changed (reinstalled, new disk), confirm the new key with the \
                     technician there and run `clinicsync keys trust <key> --replace`; otherwise this key \
                     may be someone posing as {node}",
                    fingerprint(&old),
                    fingerprint(&new_line)
                ),
            ))
        }
        Some((old, _)) => {
            detail = format!(
                "{role}; key {} replaced by {}",
                fingerprint(&old),
                fingerprint(&new_line)
            );
            replaced = Some(fingerprint(&old));
            // A new key is a new incarnation of that node (a box wiped and
            // reinstalled): its bundles count from #1 again. Those imported under the
            // old key stay on record, as `<node>@<old key fingerprint>`.
            let moved = tx.retire_bundles_of(&node, &fingerprint(&old))?;
            if moved > 0 {
                detail.push_str(&format!(
                    "; its bundle sequence restarts ({moved} earlier bundles kept under the old key)"
                ));
            }
        }
        None => {}
    }
    let action = if replaced.is_some() {
        "trust-replace"
    } else {
        "trust"
    };
    let displaced = old_parent.filter(|p| parent && *p != node);
    if let Some(p) = &displaced {
        detail.push_str(&format!("; replaces {p} as parent"));
    }
    tx.trust(&node, &new_line, parent, now)?;
    tx.audit(now, "technician", action, &node, "", &detail)?;
    tx.commit()?;
    println!(
        "now trusting {node}{}{}{}",
        if parent { " as this node's parent" } else { "" },
        replaced
            .map(|old| format!(" (its previous key {old} is no longer trusted)"))
            .unwrap_or_default(),
        displaced
            .map(|p| format!(" instead of {}", safe(&p)))
            .unwrap_or_default()
    );
    Ok(())
}

/// Resources in a JSON document: one resource, or every `entry[].resource` of a Bundle.
pub fn resources_of(bytes: &[u8]) -> Result<Vec<(Snapshot, bool)>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
    if v.get("resourceType").and_then(|t| t.as_str()) == Some("Bundle") {
        let entries = v
            .get("entry")
            .and_then(|e| e.as_array())
            .ok_or("Bundle has no entry array")?;
        entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let r = e
                    .get("resource")
                    .ok_or(format!("Bundle entry {i} has no resource"))?;
                Snapshot::from_json_value(r.clone())
                    .map(|s| (s, false))
                    .map_err(|err| format!("Bundle entry {i}: {err}"))
            })
            .collect()
    } else {
        Ok(vec![(
            Snapshot::from_json_value(v).map_err(|e| e.to_string())?,
            false,
        )])
    }
}

fn remote(cfg: &Config, node: &str, action: RemoteCmd, now: u64) -> Out {
    use crate::remote::OrderKind;
    let Some(hub) = &cfg.hub else {
        return Err(Failure::new(
            2,
            "remote orders are given at a hub; this node has no [hub] section",
        ));
    };
    if !hub.children.iter().any(|c| c.node == node) {
        let via = hub
            .children
            .iter()
            .find(|c| c.descendants.iter().any(|d| d == node));
        return Err(Failure::new(
            EXIT_NOT_FOUND,
            match via {
                Some(c) => format!(
                    "{} is below {}: only a node's parent orders it — run this at {}'s hub",
                    safe(node),
                    safe(&c.node),
                    safe(&c.node)
                ),
                None => format!("{} is not a child of this hub (hub.children)", safe(node)),
            },
        ));
    }
    let mut store = open_existing(cfg)?;
    let kind = match action {
        RemoteCmd::List { json } => {
            let rows = store.orders_out(Some(node))?;
            if json {
                print_json(&rows);
            } else {
                for o in &rows {
                    println!(
                        "{}  {}  {:<8} {}{}",
                        safe(&o.id),
                        fmt_time(o.issued_ms),
                        o.state,
                        safe(&o.order),
                        o.result
                            .as_deref()
                            .and_then(|r| r.lines().next())
                            .map(|r| format!(" — {}", safe(r)))
                            .unwrap_or_default()
                    );
                }
                eprintln!("{} orders", rows.len());
            }
            return Ok(());
        }
        RemoteCmd::Show { id } => {
            let rows = store.orders_out(Some(node))?;
            let o = rows.iter().find(|o| o.id == id).ok_or_else(|| {
                Failure::new(
                    EXIT_NOT_FOUND,
                    format!("no order {} for {}", safe(&id), safe(node)),
                )
            })?;
            println!(
                "order {}: {} for {}, given {}, {}",
                safe(&o.id),
                safe(&o.order),
                safe(&o.node),
                fmt_time(o.issued_ms),
                o.state
            );
            if let Some(r) = &o.result {
                println!("{}", safe_lines(r));
            }
            return Ok(());
        }
        RemoteCmd::Resync => OrderKind::Resync,
        RemoteCmd::Diagnostics => OrderKind::Diagnostics,
        RemoteCmd::Quarantine { action } => match action {
            RemoteQuarantineCmd::Retry { record, all } => match (record, all) {
                (Some(r), false) => OrderKind::QuarantineRetry {
                    record: Some(key(&r)?.to_string()),
                },
                (None, true) => OrderKind::QuarantineRetry { record: None },
                _ => return Err(Failure::new(2, "give a record or --all, one of the two")),
            },
            RemoteQuarantineCmd::Drop { record } => OrderKind::QuarantineDrop {
                record: key(&record)?.to_string(),
            },
        },
    };
    let id = crate::remote::issue(&mut store, node, &kind, now)?;
    println!(
        "order {id} for {}: {} — sent with its next pull; `clinicsync remote {} list` shows the result",
        safe(node),
        kind.describe(),
        safe(node)
    );
    Ok(())
}

fn quarantine(cfg: &Config, action: QuarantineCmd, now: u64) -> Out {
    let mut store = open_existing(cfg)?;
    match action {
        QuarantineCmd::List { json } => {
            let list = store.quarantine_list()?;
            if json {
                print_json(&list);
            } else {
                for q in &list {
                    println!(
                        "{:<45} {:<5} attempts {:<3} next retry {}  {}: {}",
                        safe(&q.record),
                        q.stage.as_str(),
                        q.attempts,
                        fmt_time(q.next_retry_ms),
                        match (q.stage, q.permanent) {
                            (Stage::Pull, _) => "held",
                            (_, true) => "refused",
                            (_, false) => "failed",
                        },
                        safe(&q.reason)
                    );
                }
                eprintln!("{} quarantined", list.len());
            }
        }
        QuarantineCmd::Show { record } => {
            let k = key(&record)?;
            let list = store.quarantine_list()?;
            let q = list
                .iter()
                .find(|q| q.record == k.to_string())
                .ok_or_else(|| Failure::new(EXIT_NOT_FOUND, format!("{k} is not quarantined")))?;
            let content = store.current(&k)?.map(|s| s.version.snapshot.json());
            // A record held unreadable is shown as it arrived (text, not parsed).
            let held = if q.stage == Stage::Pull {
                store
                    .inbox_body(&k)?
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
            } else {
                None
            };
            let mut shown = json!({"quarantine": q, "current": content});
            if let Some(h) = held {
                shown["held"] = json!(h);
            }
            print_json(&shown);
        }
        QuarantineCmd::Retry { record, all } => {
            let k = match (record, all) {
                (Some(r), false) => Some(key(&r)?),
                (None, true) => None,
                _ => {
                    return Err(Failure::new(
                        EXIT_USAGE,
                        "give a record or --all, one of the two",
                    ))
                }
            };
            let mut tx = store.begin()?;
            let n = tx.retry_now(k.as_ref(), now)?;
            if n == 0 {
                return Err(Failure::new(EXIT_NOT_FOUND, "nothing quarantined matches"));
            }
            let label = k.map(|k| k.to_string()).unwrap_or_else(|| "*".into());
            tx.audit(now, "technician", "retry", &label, "", "")?;
            tx.commit()?;
            println!("{n} quarantined records due for retry at the next sync");
        }
        QuarantineCmd::Drop { record } => {
            let k = key(&record)?;
            let mut tx = store.begin()?;
            if !tx.drop_quarantined(&k, now)? {
                return Err(Failure::new(
                    EXIT_NOT_FOUND,
                    format!("{k} is not quarantined"),
                ));
            }
            tx.audit(
                now,
                "technician",
                "drop",
                &k.to_string(),
                "",
                "dropped from quarantine and queue",
            )?;
            tx.commit()?;
            println!("{k} dropped from the quarantine and the queue (its history is kept)");
        }
    }
    Ok(())
}

/// The EMR's lines of `status` (a clinic's, or a hub's own central OpenMRS).
fn emr_status(cfg: &Config, store: &Store) -> Out {
    if cfg.emr.kind == config::EmrKind::Embedded {
        return Ok(());
    }
    let e = store.peer_state("emr")?;
    println!(
        "emr         {} — last capture {}, last apply {}",
        safe(&cfg.emr.url),
        e.last_pull_ok_ms
            .map(fmt_time)
            .unwrap_or_else(|| "never".into()),
        e.last_push_ok_ms
            .map(fmt_time)
            .unwrap_or_else(|| "never".into())
    );
    if let (Some(err), Some(t)) = (&e.last_error, e.last_error_ms) {
        if t >= e
            .last_pull_ok_ms
            .unwrap_or(0)
            .min(e.last_push_ok_ms.unwrap_or(0))
        {
            println!("emr error   {} {}", fmt_time(t), safe(err));
        }
    }
    Ok(())
}

fn status(cfg: &Config, json: bool) -> Out {
    let result = status_of(cfg, json);
    if let (Err(f), Some(why)) = (&result, crate::lock::stop_note(&cfg.node.store)) {
        // The store a stopped daemon found corrupt may stop `status` too: why the
        // daemon stopped is still shown.
        if json {
            print_json(&json!({
                "node": cfg.node.id, "role": cfg.role(), "store": cfg.node.store,
                "daemon_running": false, "daemon_stopped": why, "error": f.message,
            }));
        }
    }
    result
}

/// `status`'s daemon line: running, stopped by corruption (and why), or not running.
fn daemon_line(cfg: &Config) -> String {
    if crate::lock::daemon_running(&cfg.node.store) {
        "running".to_string()
    } else if let Some(why) = crate::lock::stop_note(&cfg.node.store) {
        format!(
            "STOPPED by corruption: {} (starting it again stops the same way: `clinicsync doctor`, then README, Runbook, \"Backup and restore\")",
            safe(&why)
        )
    } else {
        "NOT RUNNING (start it: systemctl start clinicsync)".to_string()
    }
}

fn status_of(cfg: &Config, json: bool) -> Out {
    if !json {
        println!("node        {} ({})", safe(&cfg.node.id), cfg.role());
        println!("daemon      {}", daemon_line(cfg));
    }
    let store = open_existing(cfg)?;
    let c = store.counts()?;
    let peer = store.peer_state(PARENT)?;
    let (cursor, head) = store.cursor(PARENT)?;
    let lag = head.saturating_sub(cursor.eff);
    // A hub with its own EMR: changes not yet written into it (children's pushes,
    // resolutions), from the EMR pass's cursor. A clinic's wait in its inbox.
    let to_emr = if cfg.hub.is_some() && cfg.emr.kind != config::EmrKind::Embedded {
        Some(store.count_changed_after(store.meta(&meta::EMR_OUT_CURSOR)?.unwrap_or(0))?)
    } else {
        None
    };
    if json {
        print_json(&json!({
            "to_emr": to_emr,
            "node": cfg.node.id, "role": cfg.role(), "store": cfg.node.store,
            "daemon_running": crate::lock::daemon_running(&cfg.node.store),
            "daemon_stopped": crate::lock::stop_note(&cfg.node.store),
            "schema": store.schema_version()?,
            "parent": cfg.parent.as_ref().map(|p| p.url.clone()),
            "records": c.records, "outbox": c.outbox, "inbox": c.inbox, "inbox_held": c.inbox_held,
            "quarantine": c.quarantine, "conflicts": c.conflicts, "conflicts_lost": c.conflicts_lost, "audit_entries": c.audit, "head_seq": c.head_seq,
            "link": peer, "cursor": {"eff": cursor.eff, "seq": cursor.seq, "parent_head": head, "lag": lag},
            "emr": store.peer_state("emr")?,
            "link_budget_bytes": store.meta(&meta::LINK_BUDGET_BYTES)?.unwrap_or(0),
            "next_sync_ms": store.meta(&meta::NEXT_SYNC_MS)?.unwrap_or(0),
            "parent_clock_skew_ms": clock_skew(&store)?.map(|(s, _)| s),
            "parent_clock_seen_ms": clock_skew(&store)?.map(|(_, t)| t),
        }));
        return Ok(());
    }
    println!(
        "store       {} (schema {}, {} records, seq {})",
        safe_display(cfg.node.store.display()),
        store.schema_version()?,
        c.records,
        c.head_seq
    );
    if let Some(p) = &cfg.parent {
        println!("parent      {}", safe(&p.url));
    }
    println!("outbox      {} waiting to push", c.outbox);
    if c.inbox_held > 0 {
        println!(
            "inbox       {} waiting to apply ({} of them held unreadable from the parent: clinicsync quarantine list)",
            c.inbox, c.inbox_held
        );
    } else {
        println!("inbox       {} waiting to apply", c.inbox);
    }
    if let Some(n) = to_emr {
        println!("to EMR      {n} changed since the last pass into the EMR (children's records, resolutions; echoes included)");
    }
    println!("quarantine  {}", c.quarantine);
    if c.conflicts_lost > 0 {
        println!(
            "conflicts   {} ({} lost at the parent: another edit won; clinicsync conflicts list)",
            c.conflicts, c.conflicts_lost
        );
    } else {
        println!("conflicts   {}", c.conflicts);
    }
    if cfg.parent.is_some() {
        println!(
            "last push   {}",
            peer.last_push_ok_ms
                .map(fmt_time)
                .unwrap_or_else(|| "never".into())
        );
        println!(
            "last pull   {}",
            peer.last_pull_ok_ms
                .map(fmt_time)
                .unwrap_or_else(|| "never".into())
        );
        // An error older than the last success is history, not the link's state.
        let last_ok_ms = peer
            .last_push_ok_ms
            .unwrap_or(0)
            .max(peer.last_pull_ok_ms.unwrap_or(0));
        if let (Some(e), Some(t)) = (&peer.last_error, peer.last_error_ms) {
            if t >= last_ok_ms {
                println!("last error  {} {}", fmt_time(t), safe(e));
            }
        }
        let last_ok = peer
            .last_push_ok_ms
            .unwrap_or(0)
            .max(peer.last_pull_ok_ms.unwrap_or(0));
        let budget = store.meta(&meta::LINK_BUDGET_BYTES)?.unwrap_or(0) as usize;
        let full = cfg
            .sync
            .push_batch_bytes
            .max(cfg.sync.pull_page_bytes as usize);
        let link = match peer.last_error_ms {
            Some(t) if t > last_ok => "down".to_string(),
            _ if last_ok == 0 => "not yet synced".to_string(),
            _ if budget != 0 && budget < full => format!(
                "degraded (batches shrunk to {} KiB after failures)",
                budget >> 10
            ),
            _ => "up".to_string(),
        };
        println!("link        {link}");
        let today = if store.meta(&meta::TRAFFIC_DAY)? == Some(wall_ms() / 86_400_000) {
            store.meta(&meta::TRAFFIC_TODAY_BYTES)?.unwrap_or(0)
        } else {
            0
        };
        match cfg.sync.daily_budget_bytes {
            0 => println!("today       {today} bytes exchanged"),
            b => println!(
                "today       {today} of {b} bytes (daily budget{})",
                if today >= b {
                    ", spent: pulls wait, pushes go"
                } else {
                    ""
                }
            ),
        }
        let next = store.meta(&meta::NEXT_SYNC_MS)?.unwrap_or(0);
        if next > 0 {
            let now = wall_ms();
            let when = if next > now {
                format!("in {} s", (next - now) / 1000)
            } else {
                "due now".into()
            };
            println!("next sync   {when} (when the daemon runs)");
        }
        println!("cursor      {cursor} (parent head {head}, lag {lag})");
        match clock_skew(&store)? {
            Some((skew, at))
                if skew.unsigned_abs() > crate::transport::http::CLOCK_SKEW_REPORTED_MS =>
            {
                println!(
                    "clock       {} (seen {}): set the clock (NTP, or `date -s`)",
                    crate::transport::http::skew_words(skew),
                    fmt_time(at)
                )
            }
            Some(_) => println!("clock       in step with the parent's"),
            None => {}
        }
        emr_status(cfg, &store)?;
        println!(
            "traffic     {} bytes sent, {} received",
            peer.bytes_sent, peer.bytes_received
        );
    } else {
        // A root hub's own EMR (the central OpenMRS).
        emr_status(cfg, &store)?;
    }
    Ok(())
}

/// This node's clock minus its parent's (ms) and when it was seen, from the last sync.
fn clock_skew(store: &Store) -> Result<Option<(i64, u64)>, Failure> {
    let Some(skew) = store.meta(&meta::PARENT_CLOCK_SKEW_MS)? else {
        return Ok(None);
    };
    Ok(Some((
        skew,
        store.meta(&meta::PARENT_CLOCK_SEEN_MS)?.unwrap_or(0),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_output_escapes_c1_controls_and_bidi_overrides_and_stays_the_same_value() {
        let v = json!({"reason": "a\u{9b}31mred\u{202e}txt\u{85}"});
        let text = json_text(&v);
        assert!(
            !text.contains('\u{9b}') && !text.contains('\u{202e}') && !text.contains('\u{85}'),
            "{text}"
        );
        assert!(
            text.contains("\\u009b") && text.contains("\\u202e"),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap(), v);
    }

    #[test]
    fn the_readme_exit_code_table_matches_the_consts() {
        let readme = include_str!("../../README.md");
        let table = exit_codes_markdown();
        assert!(
            readme.contains(&table),
            "README.md's exit code table is out of step with EXIT_CODES; it must read:\n{table}"
        );
        // Every EXIT_* constant is in the list, once.
        for code in [
            EXIT_OK,
            EXIT_FAILURE,
            EXIT_USAGE,
            EXIT_CONFIG,
            EXIT_STORE,
            EXIT_LINK,
            EXIT_AUDIT,
            EXIT_NOT_FOUND,
            EXIT_BUNDLE,
            EXIT_ATTENTION,
            EXIT_CORRUPT,
        ] {
            assert_eq!(
                EXIT_CODES.iter().filter(|(c, _)| *c == code).count(),
                1,
                "{code}"
            );
        }
        assert!(exit_codes_help().contains("  5  parent unreachable"));
    }

    #[test]
    fn times_print_as_utc() {
        assert_eq!(fmt_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(fmt_time(1_795_000_000_000), "2026-11-18T11:06:40Z");
    }

    #[test]
    fn bundles_yield_every_entry_and_name_the_bad_one() {
        let b = br#"{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Patient","id":"a"}},{"resource":{"id":"x"}}]}"#;
        let err = resources_of(b).unwrap_err();
        assert!(err.contains("entry 1"), "{err}");
    }
}
