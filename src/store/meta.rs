//! Room `meta`: small named values.
//!
//! Table: `meta(key, value)`, values as text.
//!
//! Errors: a failure rolls the transaction back; the value is as before.

use rusqlite::OptionalExtension;

use super::{Result, Store, Tx};

impl Store {
    pub fn meta_u64(&self, key: &str) -> Result<u64> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key=?1", [key], |r| {
                r.get::<_, String>(0)
            })
            .optional()?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    pub fn meta_str(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key=?1", [key], |r| r.get(0))
            .optional()?)
    }
}

impl Tx<'_> {
    pub(super) fn set_meta(&mut self, key: &str, value: &str) -> Result<()> {
        self.tx
            .prepare_cached("INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value=excluded.value")?
            .execute([key, value])?;
        Ok(())
    }

    pub(super) fn meta(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .tx
            .prepare_cached("SELECT value FROM meta WHERE key=?1")?
            .query_row([key], |r| r.get(0))
            .optional()?)
    }

    pub fn meta_str(&self, key: &str) -> Result<Option<String>> {
        self.meta(key)
    }

    pub fn set_meta_str(&mut self, key: &str, value: &str) -> Result<()> {
        self.set_meta(key, value)
    }

    pub fn set_meta_u64(&mut self, key: &str, value: u64) -> Result<()> {
        self.set_meta(key, &value.to_string())
    }
}
