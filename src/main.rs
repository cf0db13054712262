// mimalloc, not glibc's malloc: blocks made on one thread and freed on another
// (every pushed record) cost no arena lock (`clinicsync::allocator`).
clinicsync::install_allocator!();

fn main() -> std::process::ExitCode {
    return_large_buffers_to_the_os();
    clinicsync::cli::main()
}

/// A clinic's box is small: the C libraries' allocations (SQLite's, zstd's: they
/// call glibc's malloc, not the Rust allocator) of 128 KiB and more get pages of
/// their own from the kernel and go back to it when freed, instead of staying in
/// glibc's heap after the batch that needed them.
/// (glibc's default threshold starts there but rises to 32 MiB as large blocks are
/// freed, and then they never leave the heap.)
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn return_large_buffers_to_the_os() {
    // SAFETY: mallopt only changes the allocator's tuning; called before any thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_large_buffers_to_the_os() {}
