//! One error taxonomy: every error clinicsync raises answers one question — what
//! should whoever receives it do next? — with one of three classes ([`ErrorClass`]),
//! through [`Classify`]. Each module keeps its own `thiserror` enum (the store's,
//! the engine's, each transport's, …) and implements [`Classify`] for it with an
//! exhaustive `match`, so a new variant cannot compile without a decision.
//!
//! The three classes, for this system:
//!
//! - **Retryable** — the same operation, unchanged, may succeed later without a
//!   person: the link is down or cut, the parent or the EMR is busy or answers 5xx,
//!   another writer holds the store. Nothing was decided against the input. The
//!   daemon backs off and tries again; a command exits with the link/busy code.
//! - **Permanent** — the input or the configuration is wrong, and repeating the
//!   operation fails the same way until a person (or the sender) changes something:
//!   a record the parent or the EMR refused (4xx), a bad or missing configuration, a
//!   credential refused, a bundle not meant for this node, a full disk. The daemon
//!   reports it; when it concerns one record, that record alone is stopped
//!   (quarantined with the reason) and the others go on.
//! - **Corruption** — data this node stored or signed is not what was written: a
//!   value in the store clinicsync cannot have written there, a file SQLite finds
//!   damaged, a key file that holds no key, a hash that does not match what it
//!   covered, a private copy that reads short after it was written complete. Going
//!   on would spread the damage (a record read wrong is sent, applied or compared
//!   wrong), so the daemon refuses to continue and a command exits with
//!   [`ErrorClass::Corruption`]'s one exit code (`cli::EXIT_CORRUPT`); a person
//!   restores a backup or looks at the value the message names.
//!
//! Where damage meets what arrives from outside: a USB bundle whose signature does
//! not match, a frame that does not decode, an EMR answer that does not parse, are
//! refused as *permanent* for that input (or retryable where fetching again can
//! help), never as corruption. The node's own data is intact, and a class that
//! stops a node must not be in the hands of whoever can hand in a stick or garble a
//! link; the technician's next step is "bring a good copy", not "restore a backup".
//!
//! The class is a property of the error value, not of where it is caught: wrapping
//! errors (`EngineError::Store`, `SneakerError::Bundle`, …) answer with their
//! source's class, so the answer survives every layer up to the binary's edge.
//!
//! This module imports nothing of clinicsync (layer 0): every module may use it.

use std::fmt;

/// What a caller should do with an error: try again, give up on this input, or stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorClass {
    /// The same operation may succeed later without a person (back off, retry).
    Retryable,
    /// The input or the configuration is wrong; repeating fails the same way.
    Permanent,
    /// Stored or signed data is not what was written; do not continue.
    Corruption,
}

impl ErrorClass {
    /// Every class, mildest first.
    pub const ALL: [ErrorClass; 3] = [
        ErrorClass::Retryable,
        ErrorClass::Permanent,
        ErrorClass::Corruption,
    ];

    /// The word logs, JSON and the documentation use.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Retryable => "retryable",
            ErrorClass::Permanent => "permanent",
            ErrorClass::Corruption => "corruption",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// An error that knows its [`ErrorClass`]. Implement [`Classify::class`] with an
/// exhaustive `match` (no `_ =>` arm) over the error's own variants; the three
/// questions below follow from it and are not overridden, so there is one answer.
pub trait Classify {
    fn class(&self) -> ErrorClass;

    /// Worth trying again as it is, later (the daemon backs off).
    fn is_retryable(&self) -> bool {
        self.class() == ErrorClass::Retryable
    }

    /// Wrong input or configuration: report it, stop this record, do not retry as is.
    fn is_permanent(&self) -> bool {
        self.class() == ErrorClass::Permanent
    }

    /// Stored or signed data is damaged: stop and get a person.
    fn is_corruption(&self) -> bool {
        self.class() == ErrorClass::Corruption
    }
}

impl<T: Classify + ?Sized> Classify for &T {
    fn class(&self) -> ErrorClass {
        (**self).class()
    }
}

impl<T: Classify + ?Sized> Classify for Box<T> {
    fn class(&self) -> ErrorClass {
        (**self).class()
    }
}

/// I/O errors: what the operating system says about a socket or a file.
///
/// Retryable: the connection-level kinds (refused, reset, aborted, not connected,
/// broken pipe, address not available), timeouts, interruptions and "would block" —
/// the peer or the network may be back later. Everything else is permanent: a
/// missing file, a permission, a full disk (`ENOSPC`: no one frees space on a
/// clinic's box but a person), an invalid argument. An I/O error alone is never
/// corruption: a short read says a file is short, not that it was once longer —
/// the caller that knows it was complete before says so with its own variant.
impl Classify for std::io::Error {
    fn class(&self) -> ErrorClass {
        use std::io::ErrorKind as K;
        match self.kind() {
            K::ConnectionRefused
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::NotConnected
            | K::BrokenPipe
            | K::AddrNotAvailable
            | K::TimedOut
            | K::Interrupted
            | K::WouldBlock => ErrorClass::Retryable,
            // `ErrorKind` is non-exhaustive: a kind added to std is permanent until
            // someone decides otherwise.
            _ => ErrorClass::Permanent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[derive(Debug)]
    struct Fixed(ErrorClass);

    impl Classify for Fixed {
        fn class(&self) -> ErrorClass {
            self.0
        }
    }

    #[test]
    fn the_three_questions_follow_from_the_class() {
        for class in ErrorClass::ALL {
            let e = Fixed(class);
            let answers = [e.is_retryable(), e.is_permanent(), e.is_corruption()];
            assert_eq!(
                answers.iter().filter(|a| **a).count(),
                1,
                "{class}: exactly one answer is yes"
            );
            assert_eq!(e.is_retryable(), class == ErrorClass::Retryable);
            assert_eq!(e.is_permanent(), class == ErrorClass::Permanent);
            assert_eq!(e.is_corruption(), class == ErrorClass::Corruption);
            // Through a reference and a box, the same answer.
            fn class_of(e: impl Classify) -> ErrorClass {
                e.class()
            }
            assert_eq!(class_of(&e), class);
            assert_eq!(class_of(Box::new(Fixed(class))), class);
        }
    }

    #[test]
    fn the_words_are_the_documented_ones() {
        let words: Vec<&str> = ErrorClass::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(words, ["retryable", "permanent", "corruption"]);
        assert_eq!(format!("{:>10}", ErrorClass::Permanent), " permanent");
    }

    #[test]
    fn network_io_is_retryable_and_file_io_is_permanent() {
        for kind in [
            io::ErrorKind::ConnectionRefused,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::TimedOut,
            io::ErrorKind::Interrupted,
            io::ErrorKind::BrokenPipe,
        ] {
            assert_eq!(
                io::Error::from(kind).class(),
                ErrorClass::Retryable,
                "{kind:?}"
            );
        }
        for kind in [
            io::ErrorKind::NotFound,
            io::ErrorKind::PermissionDenied,
            io::ErrorKind::AlreadyExists,
            io::ErrorKind::InvalidData,
            io::ErrorKind::UnexpectedEof,
        ] {
            assert_eq!(
                io::Error::from(kind).class(),
                ErrorClass::Permanent,
                "{kind:?}"
            );
        }
        // A full disk needs a person.
        assert_eq!(
            io::Error::from_raw_os_error(libc::ENOSPC).class(),
            ErrorClass::Permanent
        );
    }
}
