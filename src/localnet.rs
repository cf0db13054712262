//! A local network of nodes on 127.0.0.1 as real processes: writes each node's
//! configuration and credentials, starts `clinicsync run`, waits for health, stops
//! with SIGTERM or kills with SIGKILL. The product's `demo` runs on it; the test kit
//! (`devkit::cluster`) adds a broker and fault proxies around it.
//! Credential files are written 0600, as a node requires of them ([`crate::filemode`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One node's files.
#[derive(Debug, Clone)]
pub struct NodeFiles {
    pub id: String,
    pub config: PathBuf,
    pub store: PathBuf,
}

/// A hub and its clinics, configured but not started.
#[derive(Debug, Clone)]
pub struct Layout {
    pub hub: NodeFiles,
    pub clinics: Vec<NodeFiles>,
    pub hub_url: String,
    pub port: u16,
}

/// A port that was free a moment ago, chosen below the kernel's ephemeral range
/// when it can be: a port from that range (what binding port 0 gives) is handed to
/// the next outgoing connection as its source port once it is released, and the
/// listener meant for it then fails with "address in use" (seen in a test that
/// picks a hub's port, lets a clinic fail to reach it, then starts the hub).
pub fn free_port() -> std::io::Result<u16> {
    let low = ephemeral_low().unwrap_or(32_768);
    if let Some(span) = low.checked_sub(FIXED_PORTS_FROM).filter(|s| *s >= 1_000) {
        use std::hash::{BuildHasher, Hasher};
        let start = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        for i in 0..64u64 {
            // 7,919 is prime: 64 distinct ports unless the span is a multiple of it.
            let port = FIXED_PORTS_FROM + (start.wrapping_add(i * 7_919) % u64::from(span)) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The lowest port [`free_port`] picks outside the ephemeral range.
const FIXED_PORTS_FROM: u16 = 10_000;

/// The first port of the kernel's ephemeral range (`ip_local_port_range`).
fn ephemeral_low() -> Option<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Writes configs for a hub on `port` and one clinic per `(id, district)`; each
/// clinic's catchment is its district. `extra_hub` is appended to the hub's `[hub]`
/// section, `sync` replaces the clinics' `[sync]` section body.
pub fn write_layout(
    dir: &Path,
    port: u16,
    clinics: &[(&str, &str)],
    sync: &str,
    extra_hub: &str,
) -> std::io::Result<Layout> {
    std::fs::create_dir_all(dir)?;
    let hub_url = format!("http://127.0.0.1:{port}");
    let mut hub_toml = format!(
        "[node]\nid = \"hub\"\nstore = {}\nkeys_dir = {}\n\n[hub]\nlisten = \"127.0.0.1:{port}\"\n{extra_hub}\n",
        toml_path(&dir.join("hub.db")),
        toml_path(&dir.join("hub.keys"))
    );
    let mut out = Vec::new();
    for (id, district) in clinics {
        let token = crate::auth::new_token();
        let token_file = dir.join(format!("{id}.token"));
        crate::filemode::write_private(&token_file, format!("{token}\n").as_bytes())?;
        hub_toml.push_str(&format!(
            "\n[[hub.children]]\nnode = \"{id}\"\ntoken_sha256 = \"{}\"\n\n[[hub.catchment]]\nnode = \"{id}\"\npath = \"address.district\"\nequals = \"{district}\"\n",
            crate::auth::token_hash(&token)
        ));
        let store = dir.join(format!("{id}.db"));
        let config = dir.join(format!("{id}.toml"));
        std::fs::write(
            &config,
            format!(
                "[node]\nid = \"{id}\"\nstore = {}\nkeys_dir = {}\n\n[parent]\nurl = \"{hub_url}\"\ntoken_file = {}\n\n[sync]\n{sync}\n",
                toml_path(&store),
                toml_path(&dir.join(format!("{id}.keys"))),
                toml_path(&token_file)
            ),
        )?;
        out.push(NodeFiles {
            id: id.to_string(),
            config,
            store,
        });
    }
    let hub_config = dir.join("hub.toml");
    std::fs::write(&hub_config, hub_toml)?;
    Ok(Layout {
        hub: NodeFiles {
            id: "hub".into(),
            config: hub_config,
            store: dir.join("hub.db"),
        },
        clinics: out,
        hub_url,
        port,
    })
}

/// A running `clinicsync` process.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
}

impl Proc {
    /// Starts `exe --config <config> <args…>`, logging to `<config>.log`.
    pub fn spawn(exe: &Path, name: &str, config: &Path, args: &[&str]) -> std::io::Result<Proc> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(config.with_extension("log"))?;
        let child = Command::new(exe)
            .arg("--config")
            .arg(config)
            .args(args)
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    fn signal(&self, sig: i32) {
        if self.pid() > 0 {
            // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
            unsafe {
                libc::kill(self.pid(), sig);
            }
        }
    }

    /// SIGKILL: the process gets no chance to clean up.
    pub fn kill9(&mut self) -> Exit {
        self.signal(libc::SIGKILL);
        self.reap()
    }

    /// SIGTERM, then waits.
    pub fn terminate(&mut self) -> Exit {
        self.signal(libc::SIGTERM);
        self.reap()
    }

    /// Waits for the process to end by itself.
    pub fn wait(&mut self) -> Exit {
        self.reap()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .map(|c| matches!(c.try_wait(), Ok(None)))
            .unwrap_or(false)
    }

    fn reap(&mut self) -> Exit {
        let Some(mut child) = self.child.take() else {
            return Exit::default();
        };
        Exit {
            code: child.wait().ok().and_then(|s| s.code()),
        }
    }

    /// Peak resident set size so far (VmHWM), in KiB, while the process runs.
    /// (wait4's ru_maxrss would also count the spawning process's image.)
    pub fn peak_rss_kb(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.kill9();
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Exit {
    pub code: Option<i32>,
}

/// Waits until the hub answers its health check.
pub fn wait_healthy(url: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(2))
        .build();
    loop {
        if agent.get(&format!("{url}/v1/health")).call().is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{url} did not become healthy within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `cond` until true or the timeout passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cond()
}

/// A path as a TOML string (quoted, escaped): a directory named with a quote, a
/// backslash or a newline cannot break or add to the configuration.
fn toml_path(p: &Path) -> String {
    toml::Value::String(p.display().to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_port_lies_below_the_ephemeral_range_and_is_free() {
        let port = free_port().unwrap();
        if let Some(low) = ephemeral_low().filter(|l| *l >= FIXED_PORTS_FROM + 1_000) {
            assert!(
                (FIXED_PORTS_FROM..low).contains(&port),
                "{port} is not in {FIXED_PORTS_FROM}..{low}"
            );
        }
        std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    }
}
