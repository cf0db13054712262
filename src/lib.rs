//! clinicsync: store-and-forward sync of OpenMRS/FHIR records between rural clinics
//! and their hubs. See ARCHITECTURE.md for the modules and the path of a record.

pub mod allocator;
pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
#[cfg(feature = "devkit")]
pub mod devkit;
pub mod emr;
pub mod engine;
pub mod error;
pub mod filemode;
pub mod health;
pub mod hub;
pub mod keys;
pub mod localnet;
pub mod lock;
pub mod metrics;
pub mod model;
pub mod remote;
pub mod secret;
pub mod sneakernet;
pub mod store;
pub mod synth;
pub mod textsafe;
pub mod time;
pub mod tls;
pub mod transport;
pub mod wire;
