//! The binary's allocator as it runs: mimalloc, with `allocator::tune`'s defaults
//! in effect from before `main` (the `.init_array` constructor), and mimalloc's own
//! environment variables still overriding them. Read from mimalloc's verbose
//! report of its options (`MIMALLOC_VERBOSE=1`, on stderr).

use std::process::Command;

/// The value mimalloc reports for `option` in a `clinicsync --version` run with
/// `env` set.
fn option_of(env: &[(&str, &str)], option: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_clinicsync"))
        .arg("--version")
        .env("MIMALLOC_VERBOSE", "1")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let prefix = format!("option '{option}': ");
    stderr
        .lines()
        .find_map(|l| l.split(&prefix).nth(1))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("mimalloc reported no {option}:\n{stderr}"))
}

#[test]
fn the_binary_runs_on_the_tuned_defaults() {
    // mimalloc's own defaults are 2 and 1000: these are tune's.
    assert_eq!(option_of(&[], "arena_eager_commit"), "0");
    assert_eq!(option_of(&[], "purge_delay"), "10");
}

#[test]
fn mimallocs_own_variables_override_the_defaults() {
    let env = [
        ("MIMALLOC_PURGE_DELAY", "250"),
        ("MIMALLOC_ARENA_EAGER_COMMIT", "1"),
    ];
    assert_eq!(option_of(&env, "purge_delay"), "250");
    assert_eq!(option_of(&env, "arena_eager_commit"), "1");
    // One set, the other keeps tune's default.
    assert_eq!(
        option_of(&[("MIMALLOC_PURGE_DELAY", "0")], "arena_eager_commit"),
        "0"
    );
}
