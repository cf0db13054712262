//! Transports move opaque protocol frames between a child and its parent. They
//! never decide whether a record is delivered: that is the engine's job, from the
//! per-record answers inside the frames.

pub mod file;
pub mod http;
