//! The benchmarks behind BENCHMARKS.md, apart from the product binary (test kit,
//! `devkit` feature): `cargo build --release --features devkit`, then
//! `target/release/clinicsync-bench push|apply|usb|mqtt|link …`. The nodes they start are
//! the real `clinicsync` binary from the same directory.

// mimalloc, not glibc's malloc: blocks made on one thread and freed on another
// (every pushed record) cost no arena lock (`clinicsync::allocator`).
clinicsync::install_allocator!();

use clap::Parser;

/// Reproducible benchmarks of clinicsync (figures for BENCHMARKS.md).
#[derive(Parser, Debug)]
#[command(name = "clinicsync-bench", version)]
struct Cli {
    #[command(subcommand)]
    action: clinicsync::devkit::bench::BenchCmd,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match clinicsync::devkit::bench::run(cli.action) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(f) => {
            if !f.message.is_empty() {
                eprintln!("{}", f.message);
            }
            std::process::ExitCode::from(f.code)
        }
    }
}
