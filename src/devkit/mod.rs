//! The test and benchmark kit, compiled only with the `devkit` feature (the tests
//! turn it on through the crate's dev-dependency on itself; the product binary is
//! built without it). Nothing in the product imports from here.
//!
//! - [`cluster`]: a mosquitto broker and TCP proxies (counting, faults) around
//!   [`crate::localnet`];
//! - [`openmrs_sim`]: an OpenMRS simulator built from OpenMRS's own source, for the
//!   adapter's and the network's tests;
//! - [`linksim`]: a bad link in user space for the link benchmark, and [`realpath`]:
//!   the same link on the kernel's TCP (htb rate, nft loss, a delay-and-cut proxy);
//! - [`bench`], [`linkbench`], [`frames`]: the benchmarks behind BENCHMARKS.md, run by the
//!   `clinicsync-bench` binary.

pub mod bench;
pub mod cluster;
pub mod frames;
pub mod linkbench;
pub mod linksim;
pub mod openmrs_sim;
pub mod realpath;
