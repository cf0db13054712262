//! Room `meta`: the node's small named values, each under a typed key.
//!
//! Table: `meta(key, value)`, every value stored as text.
//!
//! ```text
//! key                     type   kept by                 what
//! node_id                 text   Store::open             the node this file belongs to
//! seq                     u64    Tx::commit              the last change sequence handed out
//! hlc                     Hlc    Tx::commit              the clock, "<wall_ms> <counter>"
//! link_budget_bytes       u64    daemon (sync round)     adaptive batch/page budget (0: none yet)
//! link_piece_bytes        u64    daemon (chunked link)   the transfer piece size the link allowed
//! traffic_day             u64    daemon                  the UTC day `traffic_today_bytes` counts
//! traffic_today_bytes     u64    daemon                  bytes exchanged with the parent that day
//! next_sync_ms            u64    daemon                  when the next attempt is due (status)
//! parent_clock_skew_ms    i64    daemon                  this node's clock minus the parent's
//! parent_clock_seen_ms    u64    daemon                  when that skew was measured
//! link_rate_bps           u64    daemon                  the last measured download rate
//! link_up_bps             u64    client (sync round)     the smoothed upload rate (transport::rate)
//! link_latency_ms         u64    client (sync round)     the smoothed latency of a small exchange
//! push_level              u64    client (sync round)     the zstd level of the last round's push frames
//! parent_sync_refused_ms  u64    client (sync round)     when the parent last refused push+pull in one exchange
//! parent_accept           text   client (sync round)     the protocol the parent last announced ("" = v1)
//! health_sent_ms          u64    health                  arrival of the newest report passed up
//! restoring_own           bool   engine (pull)           "1" while the first pull is under way
//! bundle_seq_at_parent    u64    engine (pull)           our last USB bundle the parent imported
//! bundle_seq_out:<peer>   u64    sneakernet              our last USB bundle numbered for <peer>
//! emr_cursor              text   engine (EMR capture)    the EMR adapter's change cursor
//! emr_ids                 text   engine (EMR flows)      the EMR adapter's identity map
//! emr_out_cursor          u64    engine (hub's EMR)      the replica seq the EMR pass reached
//! ```
//!
//! Invariants
//! - A value is read and written only through its [`MetaKey`], which fixes its key
//!   text and its type; keys are made here and nowhere else, so none is misspelt or
//!   read as another type. The key texts are frozen (stores in the field hold them;
//!   a test lists them).
//! - A value that does not decode as its key's type is corruption
//!   ([`StoreError::BadValue`] naming `meta.value` and the key), never read as 0 or
//!   absent. An absent key is `None`: each caller says what that means.
//!
//! Errors: a failure rolls the transaction back; the value is as before.

use std::borrow::{Borrow, Cow};
use std::marker::PhantomData;

use rusqlite::{Connection, OptionalExtension};

use super::{shown_text, Result, Store, StoreError, Tx};
use crate::model::Hlc;

/// A key of the `meta` table and the type of its value.
pub struct MetaKey<T> {
    name: Cow<'static, str>,
    value: PhantomData<fn() -> T>,
}

impl<T> MetaKey<T> {
    const fn fixed(name: &'static str) -> MetaKey<T> {
        MetaKey {
            name: Cow::Borrowed(name),
            value: PhantomData,
        }
    }

    /// The key's text in the table.
    pub fn name(&self) -> &str {
        &self.name
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A type a `meta` value may have, and its text form. Only the store defines these
/// (the texts are an on-disk format).
pub trait MetaValue: Sized + sealed::Sealed {
    /// What a valid text is, for an error.
    const EXPECTED: &'static str;
    fn to_text(&self) -> String;
    fn from_text(text: &str) -> Option<Self>;
}

impl sealed::Sealed for u64 {}
impl MetaValue for u64 {
    const EXPECTED: &'static str = "an unsigned integer";
    fn to_text(&self) -> String {
        self.to_string()
    }
    fn from_text(text: &str) -> Option<u64> {
        text.parse().ok()
    }
}

impl sealed::Sealed for i64 {}
impl MetaValue for i64 {
    const EXPECTED: &'static str = "an integer";
    fn to_text(&self) -> String {
        self.to_string()
    }
    fn from_text(text: &str) -> Option<i64> {
        text.parse().ok()
    }
}

impl sealed::Sealed for bool {}
impl MetaValue for bool {
    const EXPECTED: &'static str = "1 or 0";
    fn to_text(&self) -> String {
        if *self { "1" } else { "0" }.to_string()
    }
    fn from_text(text: &str) -> Option<bool> {
        match text {
            "1" => Some(true),
            "0" => Some(false),
            _ => None,
        }
    }
}

impl sealed::Sealed for String {}
impl MetaValue for String {
    const EXPECTED: &'static str = "text";
    fn to_text(&self) -> String {
        self.clone()
    }
    fn from_text(text: &str) -> Option<String> {
        Some(text.to_string())
    }
}

impl sealed::Sealed for Hlc {}
impl MetaValue for Hlc {
    const EXPECTED: &'static str = "\"<wall_ms> <counter>\"";
    fn to_text(&self) -> String {
        format!("{} {}", self.wall_ms, self.counter)
    }
    fn from_text(text: &str) -> Option<Hlc> {
        let (w, c) = text.split_once(' ')?;
        Some(Hlc {
            wall_ms: w.parse().ok()?,
            counter: c.parse().ok()?,
        })
    }
}

/// The node this file belongs to ([`Store::open`] checks it).
pub(super) const NODE_ID: MetaKey<String> = MetaKey::fixed("node_id");
/// The last change sequence handed out ([`Tx::next_seq`]).
pub(super) const SEQ: MetaKey<u64> = MetaKey::fixed("seq");
/// The last place in history handed out ([`Tx::next_history_n`]): `versions.n`
/// and `replica.hn` (migration 14).
pub(super) const HISTORY_N: MetaKey<u64> = MetaKey::fixed("history_n");
/// The hybrid logical clock ([`Tx::tick`], [`Tx::observe`]).
pub(super) const HLC: MetaKey<Hlc> = MetaKey::fixed("hlc");

/// The adaptive byte budget of a batch or page, kept across rounds and restarts.
pub const LINK_BUDGET_BYTES: MetaKey<u64> = MetaKey::fixed("link_budget_bytes");
/// The resumable-transfer piece size the link last allowed.
pub const LINK_PIECE_BYTES: MetaKey<u64> = MetaKey::fixed("link_piece_bytes");
/// The UTC day (days since the epoch) that [`TRAFFIC_TODAY_BYTES`] counts.
pub const TRAFFIC_DAY: MetaKey<u64> = MetaKey::fixed("traffic_day");
/// Bytes exchanged with the parent on [`TRAFFIC_DAY`].
pub const TRAFFIC_TODAY_BYTES: MetaKey<u64> = MetaKey::fixed("traffic_today_bytes");
/// When the daemon's next sync attempt is due (its current backoff), for `status`.
pub const NEXT_SYNC_MS: MetaKey<u64> = MetaKey::fixed("next_sync_ms");
/// This node's clock minus the parent's (ms), from the parent's last answer.
pub const PARENT_CLOCK_SKEW_MS: MetaKey<i64> = MetaKey::fixed("parent_clock_skew_ms");
/// When [`PARENT_CLOCK_SKEW_MS`] was measured.
pub const PARENT_CLOCK_SEEN_MS: MetaKey<u64> = MetaKey::fixed("parent_clock_seen_ms");
/// The last measured download rate from the parent (bits per second).
pub const LINK_RATE_BPS: MetaKey<u64> = MetaKey::fixed("link_rate_bps");
/// The link's upload rate (bits per second), smoothed over exchanges
/// ([`crate::transport::rate::LinkRate`]); a value outside any plausible rate is read
/// as not measured.
pub const LINK_UP_BPS: MetaKey<u64> = MetaKey::fixed("link_up_bps");
/// The latency (ms) a small exchange costs besides its bytes, as [`LINK_UP_BPS`].
pub const LINK_LATENCY_MS: MetaKey<u64> = MetaKey::fixed("link_latency_ms");
/// The zstd level the last round's push frames went at: the next automatic choice
/// keeps it unless another is clearly better ([`crate::wire::level::choose`]).
pub const PUSH_LEVEL: MetaKey<u64> = MetaKey::fixed("push_level");
/// Arrival time (this hub's clock) of the newest health report already passed up.
pub const HEALTH_SENT_MS: MetaKey<u64> = MetaKey::fixed("health_sent_ms");
/// True while the first pull of this store (its own records included) is under way,
/// false once it completed; absent before the first pull.
pub const RESTORING_OWN: MetaKey<bool> = MetaKey::fixed("restoring_own");
/// The last USB bundle of ours the parent says it imported (a reinstalled box
/// numbers its next export after it).
pub const BUNDLE_SEQ_AT_PARENT: MetaKey<u64> = MetaKey::fixed("bundle_seq_at_parent");
/// The EMR adapter's change cursor, moved only with what it covered.
pub const EMR_CURSOR: MetaKey<String> = MetaKey::fixed("emr_cursor");
/// The EMR adapter's identity map (network id ↔ the EMR's own), kept in the same
/// transaction as whatever changed it.
pub const EMR_IDS: MetaKey<String> = MetaKey::fixed("emr_ids");
/// When the parent last refused a push and a pull in one exchange (an older hub):
/// the round sends them apart for a day.
pub const PARENT_SYNC_REFUSED_MS: MetaKey<u64> = MetaKey::fixed("parent_sync_refused_ms");
/// What the parent announced in its last answer (`X-Clinicsync-Accept`; "" for a
/// parent that announces nothing, v1): a new process's first request uses it.
pub const PARENT_ACCEPT: MetaKey<String> = MetaKey::fixed("parent_accept");
/// The replica seq up to which a hub's EMR pass has gone.
pub const EMR_OUT_CURSOR: MetaKey<u64> = MetaKey::fixed("emr_out_cursor");

/// The sequence number of the last USB bundle this node wrote for `peer`.
pub fn bundle_seq_out(peer: &str) -> MetaKey<u64> {
    MetaKey {
        name: Cow::Owned(format!("bundle_seq_out:{peer}")),
        value: PhantomData,
    }
}

/// Reads `key` on `conn` (the store's connection or a transaction's).
pub(super) fn read<T: MetaValue>(conn: &Connection, key: &MetaKey<T>) -> Result<Option<T>> {
    let value: Option<rusqlite::types::Value> = conn
        .prepare_cached("SELECT value FROM meta WHERE key=?1")?
        .query_row([key.name()], |r| r.get(0))
        .optional()?;
    // The column is text; a number written by hand reads as its text, a blob or
    // NULL is damage, named like any value of the wrong form.
    let text = value.map(|v| match v {
        rusqlite::types::Value::Text(t) => Ok(t),
        rusqlite::types::Value::Integer(n) => Ok(n.to_string()),
        rusqlite::types::Value::Real(x) => Ok(x.to_string()),
        rusqlite::types::Value::Blob(b) => Err(StoreError::bad_value(
            "meta",
            "value",
            key.name(),
            super::shown_blob(&b),
            format!("a blob, not {}", T::EXPECTED),
        )),
        rusqlite::types::Value::Null => Err(StoreError::bad_value(
            "meta",
            "value",
            key.name(),
            "NULL".into(),
            format!("not {}", T::EXPECTED),
        )),
    });
    text.transpose()?
        .map(|t| {
            T::from_text(&t).ok_or_else(|| {
                StoreError::bad_value(
                    "meta",
                    "value",
                    key.name(),
                    shown_text(&t),
                    format!("not {}", T::EXPECTED),
                )
            })
        })
        .transpose()
}

/// A counter whose numbers go into an integer column (`seq`, `history_n`): read as
/// [`read`] does, and one at SQLite's largest integer or beyond (no number left to
/// hand out; beyond, it would be stored as a negative number) is corruption, named.
pub(super) fn read_counter(conn: &Connection, key: &MetaKey<u64>) -> Result<Option<u64>> {
    match read(conn, key)? {
        Some(n) if n >= i64::MAX as u64 => Err(StoreError::bad_value(
            "meta",
            "value",
            key.name(),
            shown_text(&n.to_string()),
            "at or beyond 9223372036854775807, the largest integer SQLite stores: no number is left to hand out; restore the store from a backup",
        )),
        n => Ok(n),
    }
}

/// The last place in history handed out (meta `history_n`), checked against the
/// places `versions` holds (and, with `current_too`, the current versions' `hn`: a
/// scan of the replica, for `doctor`). A counter missing or behind them would list
/// new versions before older ones and later fail a write on `versions.n`:
/// corruption, named, never used.
pub(super) fn history_n_checked(conn: &Connection, current_too: bool) -> Result<u64> {
    let fix = "restore the store from a backup; keep the damaged file for analysis";
    let stored = read_counter(conn, &HISTORY_N)?.ok_or_else(|| {
        StoreError::bad_value(
            "meta",
            "value",
            HISTORY_N.name(),
            "nothing".into(),
            format!("missing: the counter of places in history (schema 14); {fix}"),
        )
    })?;
    let sql = if current_too {
        "SELECT max(coalesce((SELECT max(n) FROM versions), 0), coalesce((SELECT max(hn) FROM replica), 0))"
    } else {
        "SELECT coalesce(max(n), 0) FROM versions"
    };
    let held: i64 = conn.prepare_cached(sql)?.query_row([], |r| r.get(0))?;
    if i64::try_from(stored).map_or(true, |s| s < held) {
        return Err(StoreError::bad_value(
            "meta",
            "value",
            HISTORY_N.name(),
            shown_text(&stored.to_string()),
            format!("is behind place {held}, which history already holds: new versions would be listed before older ones; {fix}"),
        ));
    }
    if current_too {
        // A place handed out twice before the counter was put right: the current
        // version could not be moved into history at its place.
        let shared: Option<i64> = conn
            .prepare_cached("SELECT r.hn FROM replica r JOIN versions v ON v.n = r.hn LIMIT 1")?
            .query_row([], |r| r.get(0))
            .optional()?;
        if let Some(n) = shared {
            return Err(StoreError::bad_value(
                "meta",
                "value",
                HISTORY_N.name(),
                shown_text(&stored.to_string()),
                format!("handed out place {n} twice: a current version and one in history share it, and the next write of that record fails; {fix}"),
            ));
        }
    }
    Ok(stored)
}

/// Writes `key` on `conn`.
pub(super) fn write<T: MetaValue>(conn: &Connection, key: &MetaKey<T>, value: &T) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
    )?
    .execute([key.name(), &value.to_text()])?;
    Ok(())
}

impl Store {
    /// The value of `key` (`None`: never written).
    pub fn meta<T: MetaValue>(&self, key: &MetaKey<T>) -> Result<Option<T>> {
        read(&self.conn, key)
    }
}

impl Store {
    /// Reads every value of `meta` as its key's type, and every peer's cursor: the
    /// first that is not what it should be is returned as the corruption it is
    /// (`doctor`; the daemon would otherwise meet it mid-round). Returns how many
    /// values were read.
    pub fn check_values(&self) -> Result<usize> {
        fn one<T: MetaValue>(s: &Store, key: &MetaKey<T>, n: &mut usize) -> Result<()> {
            if s.meta(key)?.is_some() {
                *n += 1;
            }
            Ok(())
        }
        let mut n = 0;
        for key in [
            &SEQ,
            &HISTORY_N,
            &LINK_BUDGET_BYTES,
            &LINK_PIECE_BYTES,
            &TRAFFIC_DAY,
            &TRAFFIC_TODAY_BYTES,
            &NEXT_SYNC_MS,
            &PARENT_CLOCK_SEEN_MS,
            &LINK_RATE_BPS,
            &LINK_UP_BPS,
            &LINK_LATENCY_MS,
            &PUSH_LEVEL,
            &HEALTH_SENT_MS,
            &BUNDLE_SEQ_AT_PARENT,
            &PARENT_SYNC_REFUSED_MS,
            &EMR_OUT_CURSOR,
        ] {
            one(self, key, &mut n)?;
        }
        read_counter(&self.conn, &SEQ)?;
        one(self, &PARENT_CLOCK_SKEW_MS, &mut n)?;
        one(self, &RESTORING_OWN, &mut n)?;
        one(self, &HLC, &mut n)?;
        history_n_checked(&self.conn, false)?;
        for peer in self.bundle_peers()? {
            one(self, &bundle_seq_out(&peer), &mut n)?;
        }
        let peers: Vec<String> = self
            .conn
            .prepare("SELECT peer FROM cursors")?
            .query_map([], |r| r.get(0))?
            .collect::<std::result::Result<_, _>>()?;
        for peer in &peers {
            self.cursor(peer)?;
            n += 1;
        }
        Ok(n)
    }
}

impl Store {
    /// [`Store::check_values`]' check of the history counter against every place
    /// history holds, the current versions' too (a scan of the replica: `doctor`).
    pub fn check_history_places(&self) -> Result<u64> {
        history_n_checked(&self.conn, true)
    }
}

impl Store {
    /// The peers this node has numbered USB bundles for.
    fn bundle_peers(&self) -> Result<Vec<String>> {
        Ok(self
            .conn
            .prepare("SELECT substr(key, 16) FROM meta WHERE key LIKE 'bundle_seq_out:%'")?
            .query_map([], |r| r.get(0))?
            .collect::<std::result::Result<_, _>>()?)
    }

    /// The USB bundle counts beyond any real one (above
    /// [`super::PLAUSIBLE_BUNDLE_SEQ`]; clinicsync never writes one): (meta key,
    /// value). At [`super::MAX_BUNDLE_SEQ`] an export to that peer is refused until
    /// the count is put right (`doctor`).
    pub fn implausible_bundle_counts(&self) -> Result<Vec<(String, u64)>> {
        let mut keys = vec![BUNDLE_SEQ_AT_PARENT];
        keys.extend(self.bundle_peers()?.iter().map(|p| bundle_seq_out(p)));
        let mut out = Vec::new();
        for key in keys {
            if let Some(v) = self
                .meta(&key)?
                .filter(|v| *v > super::PLAUSIBLE_BUNDLE_SEQ)
            {
                out.push((key.name().to_string(), v));
            }
        }
        Ok(out)
    }
}

impl Tx<'_> {
    /// The value of `key` as this transaction sees it (`None`: never written).
    pub fn meta<T: MetaValue>(&self, key: &MetaKey<T>) -> Result<Option<T>> {
        read(&self.tx, key)
    }

    /// Sets `key` to `value`, with the rest of the transaction.
    pub fn set_meta<T: MetaValue>(
        &mut self,
        key: &MetaKey<T>,
        value: impl Borrow<T>,
    ) -> Result<()> {
        write(&self.tx, key, value.borrow())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::temp_store;

    fn raw(store: &Store, key: &str) -> Option<String> {
        store
            .conn()
            .query_row("SELECT value FROM meta WHERE key=?1", [key], |r| r.get(0))
            .optional()
            .unwrap()
    }

    /// The change sequence at or beyond SQLite's largest integer (only damage puts
    /// it there) fails the write naming `seq`, never stores a negative sequence.
    #[test]
    fn a_change_sequence_an_integer_column_cannot_hold_is_corruption() {
        let (_d, mut store) = temp_store("a");
        let exhausted = |store: &mut Store, value: &str| {
            assert!(store.check_values().is_err(), "{value}");
            let mut tx = store.begin().unwrap();
            let err = tx.next_seq().unwrap_err();
            assert!(
                err.is_corruption() && err.to_string().contains("meta.value of seq"),
                "{value}: {err}"
            );
        };
        for value in [
            "9223372036854775808",
            "18446744073709551615",
            "9223372036854775807",
        ] {
            store
                .conn()
                .execute("INSERT OR REPLACE INTO meta VALUES ('seq', ?1)", [value])
                .unwrap();
            exhausted(&mut store, value);
        }
        // The last number there is: handed out once, then the counter reads as
        // exhausted (doctor and writes agree).
        store
            .conn()
            .execute(
                "INSERT OR REPLACE INTO meta VALUES ('seq', '9223372036854775806')",
                [],
            )
            .unwrap();
        store.check_values().unwrap();
        let mut tx = store.begin().unwrap();
        assert_eq!(tx.next_seq().unwrap(), i64::MAX as u64);
        assert!(tx.next_seq().unwrap_err().is_corruption());
        drop(tx);
        let mut tx = store.begin().unwrap();
        tx.next_seq().unwrap();
        tx.commit().unwrap();
        exhausted(&mut store, "after the last");
    }

    #[test]
    fn key_texts_are_the_ones_stores_in_the_field_hold() {
        let u64_keys = [
            (&LINK_BUDGET_BYTES, "link_budget_bytes"),
            (&LINK_PIECE_BYTES, "link_piece_bytes"),
            (&TRAFFIC_DAY, "traffic_day"),
            (&TRAFFIC_TODAY_BYTES, "traffic_today_bytes"),
            (&NEXT_SYNC_MS, "next_sync_ms"),
            (&PARENT_CLOCK_SEEN_MS, "parent_clock_seen_ms"),
            (&LINK_RATE_BPS, "link_rate_bps"),
            (&LINK_UP_BPS, "link_up_bps"),
            (&LINK_LATENCY_MS, "link_latency_ms"),
            (&PUSH_LEVEL, "push_level"),
            (&HEALTH_SENT_MS, "health_sent_ms"),
            (&BUNDLE_SEQ_AT_PARENT, "bundle_seq_at_parent"),
            (&EMR_OUT_CURSOR, "emr_out_cursor"),
            (&PARENT_SYNC_REFUSED_MS, "parent_sync_refused_ms"),
            (&SEQ, "seq"),
            (&HISTORY_N, "history_n"),
        ];
        for (key, text) in u64_keys {
            assert_eq!(key.name(), text);
        }
        assert_eq!(PARENT_CLOCK_SKEW_MS.name(), "parent_clock_skew_ms");
        assert_eq!(RESTORING_OWN.name(), "restoring_own");
        assert_eq!(EMR_CURSOR.name(), "emr_cursor");
        assert_eq!(PARENT_ACCEPT.name(), "parent_accept");
        assert_eq!(EMR_IDS.name(), "emr_ids");
        assert_eq!(NODE_ID.name(), "node_id");
        assert_eq!(HLC.name(), "hlc");
        assert_eq!(bundle_seq_out("hub").name(), "bundle_seq_out:hub");
    }

    #[test]
    fn a_typed_value_round_trips_under_its_on_disk_key_and_text() {
        let (_d, mut store) = temp_store("a");
        assert_eq!(store.meta(&LINK_BUDGET_BYTES).unwrap(), None);
        let mut tx = store.begin().unwrap();
        tx.set_meta(&LINK_BUDGET_BYTES, 65_536).unwrap();
        tx.set_meta(&PARENT_CLOCK_SKEW_MS, -1_500).unwrap();
        tx.set_meta(&RESTORING_OWN, true).unwrap();
        tx.set_meta(&EMR_CURSOR, "{\"v\":2}".to_string()).unwrap();
        tx.set_meta(&bundle_seq_out("hub"), 7).unwrap();
        assert_eq!(tx.meta(&RESTORING_OWN).unwrap(), Some(true));
        tx.commit().unwrap();
        assert_eq!(store.meta(&LINK_BUDGET_BYTES).unwrap(), Some(65_536));
        assert_eq!(store.meta(&PARENT_CLOCK_SKEW_MS).unwrap(), Some(-1_500));
        assert_eq!(store.meta(&RESTORING_OWN).unwrap(), Some(true));
        assert_eq!(
            store.meta(&EMR_CURSOR).unwrap().as_deref(),
            Some("{\"v\":2}")
        );
        assert_eq!(store.meta(&bundle_seq_out("hub")).unwrap(), Some(7));
        // The texts older releases wrote and read with string keys.
        assert_eq!(raw(&store, "link_budget_bytes").as_deref(), Some("65536"));
        assert_eq!(
            raw(&store, "parent_clock_skew_ms").as_deref(),
            Some("-1500")
        );
        assert_eq!(raw(&store, "restoring_own").as_deref(), Some("1"));
        assert_eq!(raw(&store, "emr_cursor").as_deref(), Some("{\"v\":2}"));
        assert_eq!(raw(&store, "bundle_seq_out:hub").as_deref(), Some("7"));
        // And a value an older release wrote reads back typed.
        store
            .conn()
            .execute("INSERT INTO meta VALUES ('restoring_own', '0') ON CONFLICT(key) DO UPDATE SET value='0'", [])
            .unwrap();
        assert_eq!(store.meta(&RESTORING_OWN).unwrap(), Some(false));
    }

    #[test]
    fn check_values_names_the_first_value_that_is_not_its_type() {
        let (_d, mut store) = temp_store("a");
        let mut tx = store.begin().unwrap();
        tx.set_meta(&bundle_seq_out("hub"), 3).unwrap();
        tx.set_meta(&RESTORING_OWN, false).unwrap();
        tx.commit().unwrap();
        assert!(store.check_values().unwrap() >= 2);
        store
            .conn()
            .execute(
                "UPDATE meta SET value='x3' WHERE key='bundle_seq_out:hub'",
                [],
            )
            .unwrap();
        let err = store.check_values().unwrap_err();
        assert!(err.is_corruption(), "{err}");
        assert!(err.to_string().contains("bundle_seq_out:hub"), "{err}");
        store
            .conn()
            .execute(
                "UPDATE meta SET value='3' WHERE key='bundle_seq_out:hub'",
                [],
            )
            .unwrap();
        store
            .conn()
            .execute("INSERT INTO cursors VALUES ('hub', 'lots', 1, 1, 0)", [])
            .unwrap();
        let err = store.check_values().unwrap_err();
        assert!(err.is_corruption(), "a cursor that is not a number: {err}");
        assert_eq!(
            err.to_string(),
            r#"store is corrupt: cursors.eff of hub holds "lots": not an integer"#
        );
    }

    #[test]
    fn a_corrupt_link_estimate_is_named_by_check_values_and_never_read_as_unknown() {
        let (_d, mut store) = temp_store("a");
        let mut tx = store.begin().unwrap();
        tx.set_meta(&LINK_UP_BPS, 96_000).unwrap();
        tx.set_meta(&LINK_LATENCY_MS, 600).unwrap();
        tx.set_meta(&PUSH_LEVEL, 15).unwrap();
        tx.commit().unwrap();
        assert!(store.check_values().unwrap() >= 3);
        for (key, bad) in [
            ("link_up_bps", "fast"),
            ("link_latency_ms", "-5"),
            ("push_level", "15.0"),
        ] {
            store
                .conn()
                .execute("UPDATE meta SET value=?2 WHERE key=?1", [key, bad])
                .unwrap();
            let err = store.check_values().unwrap_err();
            assert!(err.is_corruption(), "{err}");
            assert!(err.to_string().contains(key), "{err}");
            assert!(err.to_string().contains(bad), "{err}");
            store
                .conn()
                .execute("UPDATE meta SET value='1' WHERE key=?1", [key])
                .unwrap();
        }
        assert!(store.check_values().is_ok());
    }

    #[test]
    fn a_value_that_is_not_its_type_is_corruption_not_zero() {
        let (_d, mut store) = temp_store("a");
        store
            .conn()
            .execute(
                "INSERT INTO meta VALUES ('link_budget_bytes', 'lots'), ('restoring_own', 'yes')",
                [],
            )
            .unwrap();
        let err = store.meta(&LINK_BUDGET_BYTES).unwrap_err();
        assert!(err.is_corruption(), "{err}");
        assert_eq!(
            err.to_string(),
            r#"store is corrupt: meta.value of link_budget_bytes holds "lots": not an unsigned integer"#
        );
        assert!(store.meta(&RESTORING_OWN).unwrap_err().is_corruption());

        // The change sequence and the clock: a write fails instead of restarting them.
        store
            .conn()
            .execute("INSERT INTO meta VALUES ('seq', '-3'), ('hlc', '12')", [])
            .unwrap();
        assert!(store.head_seq().unwrap_err().is_corruption());
        let mut tx = store.begin().unwrap();
        assert!(tx.next_seq().unwrap_err().is_corruption());
        assert!(tx.tick(5).unwrap_err().is_corruption());
    }
}
