//! `clinicsync child add|remove|list|rotate`: enrolling, removing and re-keying a
//! hub's children without a restart.
//!
//! The configuration file stays the one source of truth, and it is edited as text:
//! a new child is a block appended at the end, a removal cuts that child's lines
//! out, a rotation replaces one line and adds two — every other byte (comments,
//! order, spacing) stays as the technician wrote it. Each edit is checked before
//! anything is written: the edited text must pass the same loader the daemon uses,
//! and must differ from the old file in exactly that child (and its catchment rules)
//! — otherwise nothing is written and the error says why. The new file replaces the
//! old one atomically (a temporary file beside it, same mode and owner, fsync,
//! rename), so a crash leaves the old file or the new one, never half of one.
//!
//! A token is generated here and shown once (or written to a new 0600 file with
//! `--token-file`); the file keeps only its SHA-256. After the edit the running
//! daemon is told to reload (SIGHUP to the pid in `<store>.lock`, see
//! [`crate::lock`]); if this user may not signal it, the message gives the
//! `systemctl reload clinicsync` to run.
//!
//! Rotation keeps the old credential accepted for an overlap
//! (`previous_token_sha256` until `previous_token_expires`), so a hub can issue the
//! new token before the clinic has it; past the overlap the hub refuses the old one
//! with a message saying it was replaced.

use crate::time::fmt_time;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use serde_json::json;

use super::{print_json, Failure, Out, EXIT_CONFIG, EXIT_FAILURE, EXIT_NOT_FOUND, EXIT_USAGE};
use crate::config::Config;
use crate::engine::CatchmentRule;
use crate::model::valid_node_id;
use crate::textsafe::{safe, safe_display};
use crate::time::wall_ms;

#[derive(Subcommand, Debug)]
pub enum ChildCmd {
    /// Enrol a clinic (or district hub): a new credential, a [[hub.children]] block
    /// appended to the configuration, and a reload of the running daemon.
    Add {
        /// The child's node id (its node.id).
        node: String,
        /// A catchment rule for it, PATH=VALUE on the Patient resource
        /// (e.g. address.district=Kakamega); may be given more than once.
        #[arg(long, value_name = "PATH=VALUE")]
        catchment: Vec<String>,
        /// For a district hub: a node below it whose records it forwards (repeatable).
        #[arg(long, value_name = "NODE")]
        descendant: Vec<String>,
        /// Write the token to this new file (0600) instead of printing it.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
    /// Remove a child: its [[hub.children]] block and its [[hub.catchment]] rules.
    /// Refused by the running hub as soon as it reloads (at once).
    Remove { node: String },
    /// The children this hub serves, their catchment rules and last contact.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Give a child a new credential; the old one stays accepted for --overlap.
    Rotate {
        node: String,
        /// How long the old credential stays accepted: 7d, 12h, 30m, 90s.
        #[arg(long, default_value = "7d", value_parser = parse_duration)]
        overlap: u64,
        /// Write the new token to this new file (0600) instead of printing it.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Rotate again while an earlier rotation's overlap runs: the credential
        /// before the current one stops working at once (a clinic still using it is
        /// locked out).
        #[arg(long)]
        force: bool,
    },
}

/// `7d`, `12h`, `30m`, `90s` (or plain seconds) as milliseconds.
fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let mult: u64 = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(format!("{s:?}: use a number with s, m, h or d (e.g. 7d)")),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: use a number with s, m, h or d (e.g. 7d)"))?;
    n.checked_mul(mult)
        .and_then(|x| x.checked_mul(1000))
        .ok_or_else(|| format!("{s:?} is too long"))
}

pub fn run(path: &Path, cfg: &Config, action: ChildCmd) -> Out {
    let Some(hub) = &cfg.hub else {
        return Err(Failure::new(
            EXIT_CONFIG,
            "this node serves no children (no [hub] in its configuration)",
        ));
    };
    let known = |node: &str| hub.children.iter().any(|c| c.node == node);
    match action {
        ChildCmd::List { json } => list(cfg, json),
        ChildCmd::Add {
            node,
            catchment,
            descendant,
            token_file,
        } => {
            if !valid_node_id(&node) {
                return Err(Failure::new(
                    EXIT_USAGE,
                    format!(
                        "{:?} is not a valid node id (1-64 characters of a-z A-Z 0-9 - _ .); nothing changed",
                        safe(&node)
                    ),
                ));
            }
            if node == cfg.node.id {
                return Err(Failure::new(
                    EXIT_USAGE,
                    format!("{node} is this hub's own node id; nothing changed"),
                ));
            }
            if known(&node) {
                return Err(Failure::new(
                    EXIT_FAILURE,
                    format!(
                        "{node} is already a child of this hub; nothing changed (to give it a new credential: clinicsync child rotate {node})"
                    ),
                ));
            }
            let rules = catchment
                .iter()
                .map(|r| parse_rule(&node, r))
                .collect::<Result<Vec<_>, _>>()?;
            for d in &descendant {
                if !valid_node_id(d) {
                    return Err(Failure::new(
                        EXIT_USAGE,
                        format!(
                            "--descendant {:?} is not a valid node id; nothing changed",
                            safe(d)
                        ),
                    ));
                }
            }
            refuse_existing(token_file.as_deref())?;
            let text = read(path)?;
            let token = crate::auth::new_token();
            let hash = crate::auth::token_hash(&token);
            let mut block = format!(
                "\n# clinicsync child add {node}, {}\n[[hub.children]]\nnode = {}\ntoken_sha256 = \"{hash}\"\n",
                fmt_time(wall_ms()),
                toml_str(&node)
            );
            if !descendant.is_empty() {
                let list: Vec<String> = descendant.iter().map(|d| toml_str(d)).collect();
                block.push_str(&format!("descendants = [{}]\n", list.join(", ")));
            }
            for r in &rules {
                block.push_str(&format!(
                    "\n# clinicsync child add {node}: catchment rule\n[[hub.catchment]]\nnode = {}\npath = {}\nequals = {}\n",
                    toml_str(&r.node),
                    toml_str(&r.path),
                    toml_str(&r.equals)
                ));
            }
            let mut new_text = text.clone();
            if !new_text.is_empty() && !new_text.ends_with('\n') {
                new_text.push('\n');
            }
            new_text.push_str(&block);
            let new_cfg = check_edit(path, cfg, &new_text)?;
            let added = new_cfg.hub.as_ref().and_then(|h| {
                h.children
                    .iter()
                    .find(|c| c.node == node && c.token_sha256 == hash)
            });
            let expected_rules: Vec<CatchmentRule> = hub
                .catchment
                .iter()
                .cloned()
                .chain(rules.iter().cloned())
                .collect();
            if added.is_none()
                || new_cfg.hub.as_ref().map(|h| h.children.len()) != Some(hub.children.len() + 1)
                || new_cfg.hub.as_ref().map(|h| &h.catchment) != Some(&expected_rules)
            {
                return Err(unexpected(path));
            }
            give_token(&token, token_file.as_deref(), &node)?;
            if let Err(f) = replace_file(path, &new_text) {
                if let Some(t) = &token_file {
                    let _ = std::fs::remove_file(t);
                }
                return Err(f);
            }
            println!(
                "{node} enrolled in {} ({} catchment rule{})",
                safe_display(path.display()),
                rules.len(),
                if rules.len() == 1 { "" } else { "s" }
            );
            reload(cfg);
            Ok(())
        }
        ChildCmd::Remove { node } => {
            if !known(&node) {
                return Err(Failure::new(
                    EXIT_NOT_FOUND,
                    format!(
                        "{:?} is not a child of this hub (clinicsync child list shows them); nothing changed",
                        safe(&node)
                    ),
                ));
            }
            let text = read(path)?;
            let blocks = blocks(&text);
            let cut: Vec<&Block> = blocks
                .iter()
                .filter(|b| {
                    (b.header == "hub.children" || b.header == "hub.catchment")
                        && b.node.as_deref() == Some(node.as_str())
                })
                .collect();
            let mut new_text = String::with_capacity(text.len());
            let mut at = 0;
            for b in &cut {
                // Neighbouring blocks may share the blank lines between them.
                if b.start > at {
                    new_text.push_str(&text[at..b.start]);
                }
                at = at.max(b.end);
            }
            new_text.push_str(&text[at..]);
            let new_cfg = check_edit(path, cfg, &new_text)?;
            let new_hub = new_cfg.hub.as_ref().ok_or_else(|| unexpected(path))?;
            let kept_children: Vec<(&str, &str)> = hub
                .children
                .iter()
                .filter(|c| c.node != node)
                .map(|c| (c.node.as_str(), c.token_sha256.as_str()))
                .collect();
            let new_children: Vec<(&str, &str)> = new_hub
                .children
                .iter()
                .map(|c| (c.node.as_str(), c.token_sha256.as_str()))
                .collect();
            let kept_rules: Vec<&CatchmentRule> =
                hub.catchment.iter().filter(|r| r.node != node).collect();
            let new_rules: Vec<&CatchmentRule> = new_hub.catchment.iter().collect();
            if kept_children != new_children || kept_rules != new_rules {
                return Err(unexpected(path));
            }
            replace_file(path, &new_text)?;
            let rules = hub.catchment.len() - new_hub.catchment.len();
            println!(
                "{node} removed from {} (with {rules} catchment rule{}); its records stay at this hub",
                safe_display(path.display()),
                if rules == 1 { "" } else { "s" }
            );
            reload(cfg);
            Ok(())
        }
        ChildCmd::Rotate {
            node,
            overlap,
            token_file,
            force,
        } => {
            let Some(child) = hub.children.iter().find(|c| c.node == node) else {
                return Err(Failure::new(
                    EXIT_NOT_FOUND,
                    format!(
                        "{:?} is not a child of this hub (clinicsync child list shows them); nothing changed",
                        safe(&node)
                    ),
                ));
            };
            if let Some((_, t)) = child.previous().filter(|(_, t)| *t > wall_ms()) {
                if !force {
                    return Err(Failure::new(
                        2,
                        format!(
                            "{} is still in the overlap of its last rotation (the credential before the current one is accepted until {}): rotating again would stop that one at once, and a clinic not yet moved to the current token would be locked out. Wait, or add --force; nothing changed",
                            safe(&node),
                            fmt_time(t)
                        ),
                    ));
                }
            }
            refuse_existing(token_file.as_deref())?;
            let text = read(path)?;
            let block = blocks(&text)
                .into_iter()
                .find(|b| b.header == "hub.children" && b.node.as_deref() == Some(node.as_str()))
                .ok_or_else(|| unexpected(path))?;
            let token = crate::auth::new_token();
            let hash = crate::auth::token_hash(&token);
            let until = wall_ms().saturating_add(overlap);
            let until_text = fmt_time(until);
            // The block's lines, with the credential lines replaced.
            let mut body = String::new();
            let mut replaced = false;
            for line in text[block.start..block.end].split_inclusive('\n') {
                match line_key(line) {
                    Some("token_sha256") => {
                        body.push_str(&format!(
                            "token_sha256 = \"{hash}\"\nprevious_token_sha256 = \"{}\"\nprevious_token_expires = \"{until_text}\"\n",
                            child.token_sha256
                        ));
                        replaced = true;
                    }
                    Some("previous_token_sha256" | "previous_token_expires") => {}
                    _ => body.push_str(line),
                }
            }
            if !replaced {
                return Err(unexpected(path));
            }
            let new_text = format!("{}{body}{}", &text[..block.start], &text[block.end..]);
            let new_cfg = check_edit(path, cfg, &new_text)?;
            let new_hub = new_cfg.hub.as_ref().ok_or_else(|| unexpected(path))?;
            let ok = new_hub.children.len() == hub.children.len()
                && new_hub.catchment == hub.catchment
                && new_hub.children.iter().zip(&hub.children).all(|(n, o)| {
                    if o.node == node {
                        n.node == node
                            && n.token_sha256 == hash
                            && n.previous_token_sha256.as_deref() == Some(o.token_sha256.as_str())
                            && n.previous_token_expires.as_deref() == Some(until_text.as_str())
                    } else {
                        n.node == o.node && n.token_sha256 == o.token_sha256
                    }
                });
            if !ok {
                return Err(unexpected(path));
            }
            give_token(&token, token_file.as_deref(), &node)?;
            if let Err(f) = replace_file(path, &new_text) {
                if let Some(t) = &token_file {
                    let _ = std::fs::remove_file(t);
                }
                return Err(f);
            }
            if let Some((_, t)) = child.previous().filter(|(_, t)| *t > wall_ms()) {
                println!(
                    "note: the credential before the current one (accepted until {}) is no longer accepted",
                    fmt_time(t)
                );
            }
            println!(
                "{node} has a new credential; the old one is accepted until {until_text}. Put the new token in {node}'s parent.token_file before then."
            );
            reload(cfg);
            Ok(())
        }
    }
}

fn list(cfg: &Config, json: bool) -> Out {
    let hub = cfg
        .hub
        .as_ref()
        .ok_or_else(|| Failure::new(EXIT_CONFIG, "no [hub]"))?;
    // The store is optional here: a hub that never ran has children but no contact.
    let store = if cfg.node.store.exists() {
        Some(super::open_existing(cfg)?)
    } else {
        None
    };
    let now = wall_ms();
    let mut rows = Vec::new();
    for c in &hub.children {
        let state = match &store {
            Some(s) => {
                Some(s.peer_state(&format!("{}{}", crate::hub::CHILD_PEER_PREFIX, c.node))?)
            }
            None => None,
        };
        let last = state
            .as_ref()
            .and_then(|p| p.last_push_ok_ms.into_iter().chain(p.last_pull_ok_ms).max());
        let rules: Vec<String> = hub
            .catchment
            .iter()
            .filter(|r| r.node == c.node)
            .map(|r| format!("{}={}", r.path, r.equals))
            .collect();
        let previous_until = c.previous().map(|(_, t)| t).filter(|t| *t > now);
        rows.push(json!({
            "node": c.node,
            "catchment": rules,
            "descendants": c.descendants,
            "last_contact_ms": last,
            "last_push_ms": state.as_ref().and_then(|p| p.last_push_ok_ms),
            "last_pull_ms": state.as_ref().and_then(|p| p.last_pull_ok_ms),
            "previous_token_accepted_until_ms": previous_until,
        }));
    }
    if json {
        print_json(&rows);
        return Ok(());
    }
    for r in &rows {
        let node = r["node"].as_str().unwrap_or_default();
        let last = r["last_contact_ms"]
            .as_u64()
            .map(|t| format!("last contact {}", fmt_time(t)))
            .unwrap_or_else(|| "never in contact".into());
        let rules = r["catchment"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        println!(
            "{:<24} {:<36} catchment: {}{}",
            safe(node),
            last,
            if rules.is_empty() {
                "(none by rule)".to_string()
            } else {
                safe(&rules).into_owned()
            },
            r["previous_token_accepted_until_ms"]
                .as_u64()
                .map(|t| format!("; old credential accepted until {}", fmt_time(t)))
                .unwrap_or_default()
        );
    }
    eprintln!("{} children", rows.len());
    Ok(())
}

/// `PATH=VALUE` as a catchment rule for `node`.
fn parse_rule(node: &str, s: &str) -> Result<CatchmentRule, Failure> {
    let bad = || {
        Failure::new(
            EXIT_USAGE,
            format!(
                "--catchment {:?}: expected PATH=VALUE on the Patient, e.g. address.district=Kakamega; nothing changed",
                safe(s)
            ),
        )
    };
    let (path, value) = s.split_once('=').ok_or_else(bad)?;
    let path = path.trim();
    if path.is_empty()
        || value.is_empty()
        || path
            .split('.')
            .any(|p| p.is_empty() || !p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
    {
        return Err(bad());
    }
    Ok(CatchmentRule {
        node: node.to_string(),
        path: path.to_string(),
        equals: value.to_string(),
    })
}

/// A TOML basic string (quotes and backslashes escaped; control characters as \u).
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn read(path: &Path) -> Result<String, Failure> {
    std::fs::read_to_string(path).map_err(|e| {
        Failure::new(
            EXIT_CONFIG,
            format!("cannot read {}: {e}", safe_display(path.display())),
        )
    })
}

fn refuse_existing(token_file: Option<&Path>) -> Out {
    match token_file {
        Some(t) if t.exists() => Err(Failure::new(
            EXIT_FAILURE,
            format!(
                "--token-file {} exists; give a new file (a token file is never overwritten); nothing changed",
                safe_display(t.display())
            ),
        )),
        _ => Ok(()),
    }
}

/// Shows the token once, or writes it to a new private file.
fn give_token(token: &str, file: Option<&Path>, node: &str) -> Out {
    match file {
        Some(f) => {
            crate::filemode::write_private(f, format!("{token}\n").as_bytes()).map_err(|e| {
                Failure::new(
                    EXIT_FAILURE,
                    format!(
                        "--token-file {}: {e}; nothing changed",
                        safe_display(f.display())
                    ),
                )
            })?;
            println!(
                "token for {node} written to {} (0600): copy it to {node}'s parent.token_file",
                safe_display(f.display())
            );
        }
        None => {
            println!("token: {token}");
            println!(
                "  (shown once: put it in {node}'s parent.token_file, mode 0600, owned by the service user)"
            );
        }
    }
    Ok(())
}

/// The edited text must load as the daemon would load it.
fn check_edit(path: &Path, _old: &Config, text: &str) -> Result<Config, Failure> {
    Config::parse(text, path).map_err(|e| {
        Failure::new(
            EXIT_CONFIG,
            format!("the edited configuration would not be valid, so nothing changed:\n{e}"),
        )
    })
}

fn unexpected(path: &Path) -> Failure {
    Failure::new(
        EXIT_CONFIG,
        format!(
            "{} is laid out in a way this command cannot edit safely (e.g. hub.children written inline); nothing changed: edit it by hand, then `systemctl reload clinicsync`",
            safe_display(path.display())
        ),
    )
}

/// Replaces `path` with `text` atomically, keeping its mode and owner.
fn replace_file(path: &Path, text: &str) -> Out {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let io = |e: std::io::Error| {
        let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
            " (the configuration belongs to root: run this command with sudo)"
        } else {
            ""
        };
        Failure::new(
            EXIT_FAILURE,
            format!(
                "cannot write {}: {e}{hint}; nothing changed",
                safe_display(path.display())
            ),
        )
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "clinicsync.toml".into());
    let tmp = path.with_file_name(format!(".{name}.child-edit"));
    let _ = std::fs::remove_file(&tmp);
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        // Same owner and mode as the file it replaces (chown needs root; as the
        // owner it is a no-op that succeeds).
        std::os::unix::fs::fchown(&f, Some(meta.uid()), Some(meta.gid()))?;
        f.set_permissions(std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(())
}

/// Tells the running daemon to re-read its configuration.
fn reload(cfg: &Config) {
    let store = &cfg.node.store;
    if !crate::lock::daemon_running(store) {
        println!("the daemon is not running: the change applies when it starts");
        return;
    }
    let Some(pid) = crate::lock::daemon_pid(store) else {
        println!("apply it now: systemctl reload clinicsync");
        return;
    };
    // SAFETY: kill(2) sends a signal; the pid comes from the lock its daemon holds.
    if unsafe { libc::kill(pid, libc::SIGHUP) } == 0 {
        println!(
            "the running daemon (pid {pid}) was told to reload: it applies the change at once (its log says \"configuration reloaded\")"
        );
    } else {
        println!(
            "could not signal the daemon (pid {pid}: {}): apply it now with systemctl reload clinicsync",
            std::io::Error::last_os_error()
        );
    }
}

/// One `[header]` or `[[header]]` section of the file, as byte offsets: from its
/// header line (with comment lines written by this command just above it) to its
/// last key line and the blank lines after it. `node` is its `node = "…"` value.
#[derive(Debug)]
struct Block {
    header: String,
    node: Option<String>,
    start: usize,
    end: usize,
}

fn line_key(line: &str) -> Option<&str> {
    let t = line.trim_start();
    if t.starts_with('#') || t.starts_with('[') {
        return None;
    }
    let (k, _) = t.split_once('=')?;
    Some(k.trim())
}

fn blocks(text: &str) -> Vec<Block> {
    let mut lines = Vec::new();
    let mut at = 0;
    for l in text.split_inclusive('\n') {
        lines.push((at, l));
        at += l.len();
    }
    let header_of = |l: &str| -> Option<String> {
        let t = l.trim();
        let t = t.split('#').next().unwrap_or("").trim();
        let inner = t
            .strip_prefix("[[")
            .and_then(|r| r.strip_suffix("]]"))
            .or_else(|| t.strip_prefix('[').and_then(|r| r.strip_suffix(']')))?;
        Some(inner.trim().to_string())
    };
    let mut out = Vec::new();
    let heads: Vec<usize> = (0..lines.len())
        .filter(|&i| header_of(lines[i].1).is_some())
        .collect();
    for (n, &h) in heads.iter().enumerate() {
        let next = heads.get(n + 1).copied().unwrap_or(lines.len());
        // Start: our own comment lines (and the blank line before them) just above.
        let mut first = h;
        while first > 0
            && lines[first - 1]
                .1
                .trim_start()
                .starts_with("# clinicsync child")
        {
            first -= 1;
        }
        if first < h && first > 0 && lines[first - 1].1.trim().is_empty() {
            first -= 1;
        }
        // End: the last key line, then the blank lines after it.
        let mut last = h;
        for (i, line) in lines.iter().enumerate().take(next).skip(h + 1) {
            let t = line.1.trim();
            if !t.is_empty() && !t.starts_with('#') {
                last = i;
            }
        }
        let mut end = last + 1;
        while end < next && lines[end].1.trim().is_empty() {
            end += 1;
        }
        let body: String = lines[h + 1..last + 1].iter().map(|(_, l)| *l).collect();
        let node = toml::from_str::<toml::Table>(&body)
            .ok()
            .and_then(|t| t.get("node").and_then(|v| v.as_str()).map(str::to_string));
        out.push(Block {
            header: header_of(lines[h].1).unwrap_or_default(),
            node,
            start: lines[first].0,
            end: lines.get(end).map(|(o, _)| *o).unwrap_or(text.len()),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("7d").unwrap(), 7 * 86_400_000);
        assert_eq!(parse_duration("90s").unwrap(), 90_000);
        assert_eq!(parse_duration("3").unwrap(), 3000);
        assert!(parse_duration("7w").is_err());
    }

    #[test]
    fn blocks_keep_comments_that_belong_to_the_next_section() {
        let text = "[hub]\nlisten = \"x\"\n\n[[hub.children]]\nnode = \"a\"\ntoken_sha256 = \"h\"\n\n# The second clinic\n[[hub.children]]\nnode = \"b\"\n";
        let b = blocks(text);
        let a = b.iter().find(|b| b.node.as_deref() == Some("a")).unwrap();
        let cut = format!("{}{}", &text[..a.start], &text[a.end..]);
        assert_eq!(
            cut,
            "[hub]\nlisten = \"x\"\n\n# The second clinic\n[[hub.children]]\nnode = \"b\"\n"
        );
    }
}
