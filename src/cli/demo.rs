//! `clinicsync demo`: a hub and two clinics as separate processes on 127.0.0.1,
//! each with its own embedded store, synthetic OpenMRS-shaped data, a sync, and
//! every node's status, then the hub's `fleet` view built from its clinics' health reports.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cli::{Failure, EXIT_FAILURE, EXIT_USAGE};
use crate::localnet::{self, Proc};
use crate::store::Store;
use crate::synth;

fn fail(e: impl std::fmt::Display) -> Failure {
    Failure::new(EXIT_FAILURE, format!("demo: {e}"))
}

fn put(
    exe: &Path,
    config: &Path,
    resources: Vec<serde_json::Value>,
    dir: &Path,
    name: &str,
) -> Result<(), Failure> {
    let file = dir.join(format!("{name}.json"));
    std::fs::write(
        &file,
        serde_json::to_vec(&synth::bundle(resources)).map_err(fail)?,
    )
    .map_err(fail)?;
    let out = std::process::Command::new(exe)
        .arg("--config")
        .arg(config)
        .arg("put")
        .arg(&file)
        .output()
        .map_err(fail)?;
    if !out.status.success() {
        return Err(fail(format!(
            "put {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    println!("  {name}: {}", String::from_utf8_lossy(&out.stdout).trim());
    Ok(())
}

/// `path` as one word for a POSIX shell: as it is when it holds only characters no
/// shell treats specially, otherwise in single quotes (a `'` inside as `'\''`), so a
/// printed hint can be pasted as it is.
fn shell_word(path: &Path) -> String {
    let s = path.display().to_string();
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+,:@%".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The demo's own directory, removed when the demo ends (unless `--dir` named one).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run(dir: Option<PathBuf>, patients: usize) -> Result<(), Failure> {
    let mut cleanup = None;
    let named = dir.is_some();
    let dir = match dir {
        Some(d) => {
            if d.exists() && !d.is_dir() {
                return Err(Failure::new(
                    EXIT_USAGE,
                    format!(
                        "demo: --dir {}: not a directory; name a new or empty directory",
                        d.display()
                    ),
                ));
            }
            // Another demo's (or anything's) files would be mixed with this one's:
            // stores reused, configurations overwritten.
            if std::fs::read_dir(&d).is_ok_and(|mut entries| entries.next().is_some()) {
                return Err(Failure::new(
                    EXIT_USAGE,
                    format!(
                        "demo: --dir {}: the directory is not empty; name a new or empty one (the demo writes its nodes' stores and configurations there)",
                        d.display()
                    ),
                ));
            }
            std::fs::create_dir_all(&d).map_err(|e| fail(format!("--dir {}: {e}", d.display())))?;
            // Absolute, so the configurations and hints work from any directory.
            std::fs::canonicalize(&d).map_err(|e| fail(format!("--dir {}: {e}", d.display())))?
        }
        None => {
            let d =
                std::env::temp_dir().join(format!("clinicsync-demo-{:08x}", rand::random::<u32>()));
            crate::filemode::private_dir(&d).map_err(fail)?;
            cleanup = Some(RemoveOnDrop(d.clone()));
            d
        }
    };
    let result = run_in(&dir, patients, &mut cleanup);
    match result {
        // A named directory keeps what was written before the failure: say so, since
        // another demo will not write into it until it is emptied.
        Err(mut f) if named => {
            f.message = format!(
                "{}\nThe demo's files so far are kept in {} (its logs included); remove them before running another demo there.",
                f.message,
                shell_word(&dir)
            );
            Err(f)
        }
        other => other,
    }
}

fn run_in(dir: &Path, patients: usize, cleanup: &mut Option<RemoveOnDrop>) -> Result<(), Failure> {
    let exe = std::env::current_exe().map_err(fail)?;
    let port = localnet::free_port().map_err(fail)?;
    let layout = localnet::write_layout(
        dir,
        port,
        &[("clinic-a", "Kakamega"), ("clinic-b", "Bungoma")],
        "interval_secs = 1\nbackoff_min_secs = 1\nbackoff_max_secs = 5",
        "",
    )
    .map_err(fail)?;
    println!("== clinicsync demo in {}", dir.display());
    println!("1. metadata at the hub, patients registered at each clinic");
    put(
        &exe,
        &layout.hub.config,
        vec![
            synth::location("loc-central", "Central Hospital", "Kakamega"),
            synth::location("loc-kakamega", "Kakamega Dispensary", "Kakamega"),
            synth::location("loc-bungoma", "Bungoma Health Centre", "Bungoma"),
        ],
        dir,
        "hub-metadata",
    )?;
    let a = &layout.clinics[0];
    let b = &layout.clinics[1];
    put(
        &exe,
        &a.config,
        synth::clinic_records(1, "a", "Kakamega", "loc-kakamega", patients, 2, 3),
        dir,
        "clinic-a-patients",
    )?;
    put(
        &exe,
        &b.config,
        synth::clinic_records(2, "b", "Bungoma", "loc-bungoma", patients, 2, 3),
        dir,
        "clinic-b-patients",
    )?;
    // A patient registered centrally who lives in clinic A's district.
    let mut g = synth::Gen::new(3);
    put(
        &exe,
        &layout.hub.config,
        vec![synth::patient(&mut g, "hub-p0", "Kakamega")],
        dir,
        "hub-patient",
    )?;

    println!("2. start the hub and both clinics (separate processes)");
    let mut hub = Proc::spawn(&exe, "hub", &layout.hub.config, &["run"]).map_err(fail)?;
    localnet::wait_healthy(&layout.hub_url, Duration::from_secs(20)).map_err(fail)?;
    let mut procs: Vec<Proc> = layout
        .clinics
        .iter()
        .map(|c| Proc::spawn(&exe, &c.id, &c.config, &["run"]))
        .collect::<Result<_, _>>()
        .map_err(fail)?;

    println!("3. wait until both clinics have pushed everything and pulled their catchment");
    let expected_hub = 3 + 1 + 2 * patients * (1 + 2 * 4);
    let converged = localnet::wait_until(Duration::from_secs(60), || {
        let count = |p: &Path| Store::open_existing(p).and_then(|s| s.counts()).ok();
        let (Some(h), Some(ca), Some(cb)) =
            (count(&layout.hub.store), count(&a.store), count(&b.store))
        else {
            return false;
        };
        h.records as usize == expected_hub
            && ca.outbox == 0
            && cb.outbox == 0
            && ca.records as usize == 3 + 1 + patients * 9
            && cb.records as usize == 3 + patients * 9
    });
    // Status and the fleet view are read while the nodes still run, as a technician
    // would see them; the nodes stop after.
    println!("4. status of every node\n");
    for node in std::iter::once(&layout.hub).chain(layout.clinics.iter()) {
        let out = std::process::Command::new(&exe)
            .arg("--config")
            .arg(&node.config)
            .arg("status")
            .output()
            .map_err(fail)?;
        println!("--- {}\n{}", node.id, String::from_utf8_lossy(&out.stdout));
    }
    println!("5. the hub's view of its clinics (from the health reports they sent)\n");
    let out = std::process::Command::new(&exe)
        .arg("--config")
        .arg(&layout.hub.config)
        .arg("fleet")
        .output()
        .map_err(fail)?;
    println!("{}", String::from_utf8_lossy(&out.stdout));
    for p in procs.iter_mut() {
        p.terminate();
    }
    hub.terminate();
    if !converged {
        // Kept, so the logs it names are there to read.
        if let Some(keep) = cleanup.take() {
            std::mem::forget(keep);
        }
        return Err(fail(format!(
            "nodes did not converge within 60 s; logs are in {}",
            dir.display()
        )));
    }
    if patients == 0 {
        println!("Converged: the hub holds the metadata; clinic-a also got hub-p0 (its district); clinic-b did not. (No clinic patients: --patients 0.)");
    } else {
        println!("Converged: the hub holds both clinics' patients and the metadata; clinic-a also got hub-p0 (its district); clinic-b did not.");
    }
    if cleanup.is_some() {
        // The nodes go with the temporary directory: hints naming it would not work.
        println!(
            "The demo's nodes are removed now. To keep them: clinicsync demo --dir <new directory>, then try"
        );
        println!("  clinicsync --config <directory>/clinic-a.toml history Patient/a-p0");
        println!("  clinicsync --config <directory>/hub.toml fleet --json");
    } else {
        println!(
            "Try: clinicsync --config {} history Patient/{}",
            shell_word(&a.config),
            if patients == 0 { "hub-p0" } else { "a-p0" }
        );
        println!(
            "     clinicsync --config {} fleet --json",
            shell_word(&layout.hub.config)
        );
    }
    Ok(())
}
