#![no_main]
// Harness: clinicsync_fuzz::handle_push (tests/fuzz/src/lib.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| clinicsync_fuzz::handle_push(data));
