//! Room `orders`: remote orders (migration 8, [`crate::remote`]).
//!
//! Tables
//! ```text
//! orders_out(id, node, kind, issued_ms, state, result, done_ms)   at a hub
//! orders_in(id, by, kind, received_ms, state, result, reported)    at a child
//! ```
//! `kind` is the order's JSON ([`crate::wire::orders::OrderKind`]); `state` is `pending`
//! (hub, until the result returns), `done`, `refused` or `failed`.
//!
//! Invariants
//! - A hub's order stays `pending` until its own child reports it (another child's
//!   result for it changes nothing).
//! - A child runs each order once (`orders_in` keyed by id) and keeps its result
//!   until reported up (`reported`).
//!
//! Errors: a failure rolls the transaction back; the order is as before.

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::{shown_text, Result, Store, StoreError, Tx};

/// An order's kind as this hub stored it (`orders_out.kind`, JSON).
fn order_kind(id: &str, text: &str) -> Result<crate::wire::orders::OrderKind> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::bad_value("orders_out", "kind", id, shown_text(text), e))
}

text_enum! {
    /// How far an order went (`orders_out.state`, `orders_in.state`).
    pub enum OrderState {
        /// Given by the hub, its result not back yet (hub only).
        Pending = "pending",
        /// Ran, and did what it says.
        Done = "done",
        /// Not run: the child does not accept remote orders.
        Refused = "refused",
        /// Ran, and could not do it (the result says why).
        Failed = "failed",
    }
}

/// An order a hub gave (`remote list`).
#[derive(Debug, Clone, Serialize)]
pub struct OrderRow {
    pub id: String,
    pub node: String,
    pub order: String,
    pub issued_ms: u64,
    pub state: OrderState,
    pub result: Option<String>,
    pub done_ms: Option<u64>,
}

impl Store {
    /// Hub: orders still waiting for `node`'s result, oldest first.
    pub fn pending_orders(
        &self,
        node: &str,
        limit: usize,
    ) -> Result<Vec<crate::wire::orders::Order>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, issued_ms, kind FROM orders_out WHERE node=?1 AND state=?3 ORDER BY issued_ms, id LIMIT ?2",
        )?;
        let rows = stmt.query_map(
            params![node, limit as i64, OrderState::Pending.as_str()],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, String>(2)?,
                ))
            },
        )?;
        let mut out = Vec::new();
        for row in rows {
            let (id, issued_ms, kind) = row?;
            let kind = order_kind(&id, &kind)?;
            out.push(crate::wire::orders::Order {
                id,
                issued_ms,
                by: self.node_id().to_string(),
                kind,
            });
        }
        Ok(out)
    }

    /// Hub: the orders given to `node` (all nodes: `None`), newest first.
    pub fn orders_out(&self, node: Option<&str>) -> Result<Vec<OrderRow>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, node, kind, issued_ms, state, result, done_ms FROM orders_out
             WHERE (?1 IS NULL OR node = ?1) ORDER BY issued_ms DESC, id",
        )?;
        let mut rows = stmt.query(params![node])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let id: String = r.get(0)?;
            let order = order_kind(&id, &r.get::<_, String>(2)?)?.describe();
            out.push(OrderRow {
                node: r.get(1)?,
                order,
                issued_ms: r.get::<_, i64>(3)? as u64,
                state: OrderState::decode("orders_out", "state", &id, &r.get::<_, String>(4)?)?,
                result: r.get(5)?,
                done_ms: r.get::<_, Option<i64>>(6)?.map(|v| v as u64),
                id,
            });
        }
        Ok(out)
    }

    /// Child: whether order `id` already ran here.
    pub fn order_in_seen(&self, id: &str) -> Result<bool> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM orders_in WHERE id=?1")?
            .query_row([id], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Child: results not yet reported to the parent.
    pub fn order_results_unreported(
        &self,
        limit: usize,
    ) -> Result<Vec<crate::wire::orders::OrderResult>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, state, result FROM orders_in WHERE reported=0 ORDER BY received_ms, id LIMIT ?1",
        )?;
        let mut rows = stmt.query(params![limit as i64])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let id: String = r.get(0)?;
            let state = OrderState::decode("orders_in", "state", &id, &r.get::<_, String>(1)?)?;
            out.push(crate::wire::orders::OrderResult {
                id,
                state: state.as_str().to_string(),
                detail: r.get(2)?,
            });
        }
        Ok(out)
    }
}

impl Tx<'_> {
    /// Hub: a new pending order.
    pub fn put_order_out(
        &mut self,
        id: &str,
        node: &str,
        kind: &crate::wire::orders::OrderKind,
        now_ms: u64,
    ) -> Result<()> {
        let kind = serde_json::to_string(kind).map_err(|source| StoreError::Encode {
            what: format!("order {id}"),
            source,
        })?;
        self.tx
            .prepare_cached(
                "INSERT INTO orders_out(id, node, kind, issued_ms, state) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![id, node, kind, now_ms as i64, OrderState::Pending.as_str()])?;
        Ok(())
    }

    /// Hub: a pending order of `child` gets its result. False if there is no such
    /// pending order for that child.
    pub fn finish_order_out(
        &mut self,
        id: &str,
        child: &str,
        state: OrderState,
        result: &str,
        now_ms: u64,
    ) -> Result<bool> {
        Ok(self
            .tx
            .prepare_cached(
                "UPDATE orders_out SET state=?3, result=?4, done_ms=?5 WHERE id=?1 AND node=?2 AND state=?6",
            )?
            .execute(params![
                id,
                child,
                state.as_str(),
                result,
                now_ms as i64,
                OrderState::Pending.as_str()
            ])?
            > 0)
    }

    /// Child: an order ran, with its result to report.
    pub fn put_order_in(
        &mut self,
        o: &crate::wire::orders::Order,
        state: OrderState,
        result: &str,
        now_ms: u64,
    ) -> Result<()> {
        let kind = serde_json::to_string(&o.kind).map_err(|source| StoreError::Encode {
            what: format!("order {}", o.id),
            source,
        })?;
        self.tx
            .prepare_cached(
                "INSERT INTO orders_in(id, by, kind, received_ms, state, result, reported) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0)",
            )?
            .execute(params![o.id, o.by, kind, now_ms as i64, state.as_str(), result])?;
        Ok(())
    }

    pub fn report_order_in_again(&mut self, id: &str) -> Result<()> {
        self.tx
            .prepare_cached("UPDATE orders_in SET reported=0 WHERE id=?1")?
            .execute([id])?;
        Ok(())
    }

    pub fn mark_order_in_reported(&mut self, id: &str) -> Result<()> {
        self.tx
            .prepare_cached("UPDATE orders_in SET reported=1 WHERE id=?1")?
            .execute([id])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::store::temp_store;
    use crate::wire::orders::OrderKind;

    #[test]
    fn an_order_keeps_its_state_and_an_unknown_state_or_kind_is_corruption() {
        let (_d, mut store) = temp_store("hub");
        let mut tx = store.begin().unwrap();
        tx.put_order_out("o1", "c", &OrderKind::Resync, 1).unwrap();
        tx.put_order_out("o2", "c", &OrderKind::Diagnostics, 2)
            .unwrap();
        assert!(!tx
            .finish_order_out("o1", "other", OrderState::Done, "", 3)
            .unwrap());
        assert!(tx
            .finish_order_out("o1", "c", OrderState::Done, "ok", 3)
            .unwrap());
        assert!(!tx
            .finish_order_out("o1", "c", OrderState::Failed, "again", 4)
            .unwrap());
        tx.commit().unwrap();
        let rows = store.orders_out(Some("c")).unwrap();
        let states: Vec<(&str, OrderState)> =
            rows.iter().map(|o| (o.id.as_str(), o.state)).collect();
        assert_eq!(
            states,
            [("o2", OrderState::Pending), ("o1", OrderState::Done)]
        );
        assert_eq!(store.pending_orders("c", 10).unwrap().len(), 1);
        store
            .conn()
            .execute("UPDATE orders_out SET state='lost' WHERE id='o1'", [])
            .unwrap();
        let err = store.orders_out(None).unwrap_err();
        assert!(
            err.is_corruption() && err.to_string().contains("orders_out.state of o1"),
            "{err}"
        );
        store
            .conn()
            .execute(
                "UPDATE orders_out SET state='done', kind='{\"bogus\":1}' WHERE id='o1'",
                [],
            )
            .unwrap();
        let err = store.orders_out(None).unwrap_err();
        assert!(
            err.is_corruption() && err.to_string().contains("orders_out.kind of o1"),
            "{err}"
        );
    }
}
